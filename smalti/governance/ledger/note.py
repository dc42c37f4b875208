"""Deprecated: moved to ``smalti.trust.note``. This alias is kept for one release (removed in 0.3)."""

import sys
import warnings

from smalti.trust import note as _moved

DEPRECATED_ALIAS = True
warnings.warn(
    "smalti.governance.ledger.note moved to smalti.trust.note; import it from there", DeprecationWarning, stacklevel=2
)
sys.modules[__name__] = _moved
