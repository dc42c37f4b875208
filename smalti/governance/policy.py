"""Deprecated: moved to ``smalti.trust.policy``. This alias is kept for one release (removed in 0.3)."""

import sys
import warnings

from smalti.trust import policy as _moved

DEPRECATED_ALIAS = True
warnings.warn(
    "smalti.governance.policy moved to smalti.trust.policy; import it from there", DeprecationWarning, stacklevel=2
)
sys.modules[__name__] = _moved
