"""Deprecated: moved to ``smalti.trust.keys``. This alias is kept for one release (removed in 0.3)."""

import sys
import warnings

from smalti.trust import keys as _moved

DEPRECATED_ALIAS = True
warnings.warn(
    "smalti.governance.keys moved to smalti.trust.keys; import it from there", DeprecationWarning, stacklevel=2
)
sys.modules[__name__] = _moved
