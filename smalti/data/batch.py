"""Deprecated: moved to ``smalti.core.batch``. This alias is kept for one release (removed in 0.3)."""

import sys
import warnings

from smalti.core import batch as _moved

DEPRECATED_ALIAS = True
warnings.warn("smalti.data.batch moved to smalti.core.batch; import it from there", DeprecationWarning, stacklevel=2)
sys.modules[__name__] = _moved
