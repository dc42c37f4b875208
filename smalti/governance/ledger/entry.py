"""Deprecated: moved to ``smalti.trust.entry``. This alias is kept for one release (removed in 0.3)."""

import sys
import warnings

from smalti.trust import entry as _moved

DEPRECATED_ALIAS = True
warnings.warn(
    "smalti.governance.ledger.entry moved to smalti.trust.entry; import it from there", DeprecationWarning, stacklevel=2
)
sys.modules[__name__] = _moved
