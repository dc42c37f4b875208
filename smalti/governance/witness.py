"""Deprecated: moved to ``smalti.workflows.witness``. This alias is kept for one release (removed in 0.3)."""

import sys
import warnings

from smalti.workflows import witness as _moved

DEPRECATED_ALIAS = True
warnings.warn(
    "smalti.governance.witness moved to smalti.workflows.witness; import it from there",
    DeprecationWarning,
    stacklevel=2,
)
sys.modules[__name__] = _moved
