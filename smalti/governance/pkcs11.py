"""Deprecated: moved to ``smalti.trust.pkcs11``. This alias is kept for one release (removed in 0.3)."""

import sys
import warnings

from smalti.trust import pkcs11 as _moved

DEPRECATED_ALIAS = True
warnings.warn(
    "smalti.governance.pkcs11 moved to smalti.trust.pkcs11; import it from there", DeprecationWarning, stacklevel=2
)
sys.modules[__name__] = _moved
