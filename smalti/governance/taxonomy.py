"""Deprecated: moved to ``smalti.trust.taxonomy``. This alias is kept for one release (removed in 0.3)."""

import sys
import warnings

from smalti.trust import taxonomy as _moved

DEPRECATED_ALIAS = True
warnings.warn(
    "smalti.governance.taxonomy moved to smalti.trust.taxonomy; import it from there", DeprecationWarning, stacklevel=2
)
sys.modules[__name__] = _moved
