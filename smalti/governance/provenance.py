"""Deprecated: moved to ``smalti.workflows.provenance``. This alias is kept for one release (removed in 0.3)."""

import sys
import warnings

from smalti.workflows import provenance as _moved

DEPRECATED_ALIAS = True
warnings.warn(
    "smalti.governance.provenance moved to smalti.workflows.provenance; import it from there",
    DeprecationWarning,
    stacklevel=2,
)
sys.modules[__name__] = _moved
