"""Deprecated: moved to ``smalti.workflows.lineage_deletion``. This alias is kept for one release (removed in 0.3)."""

import sys
import warnings

from smalti.workflows import lineage_deletion as _moved

DEPRECATED_ALIAS = True
warnings.warn(
    "smalti.governance.lineage_deletion moved to smalti.workflows.lineage_deletion; import it from there",
    DeprecationWarning,
    stacklevel=2,
)
sys.modules[__name__] = _moved
