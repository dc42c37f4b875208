"""Deprecated: moved to ``smalti.workflows.report``. This alias is kept for one release (removed in 0.3)."""

import sys
import warnings

from smalti.workflows import report as _moved

DEPRECATED_ALIAS = True
warnings.warn(
    "smalti.governance.ledger.report moved to smalti.workflows.report; import it from there",
    DeprecationWarning,
    stacklevel=2,
)
sys.modules[__name__] = _moved
