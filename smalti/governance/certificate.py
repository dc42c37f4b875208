"""Deprecated: moved to ``smalti.workflows.certificate``. This alias is kept for one release (removed in 0.3)."""

import sys
import warnings

from smalti.workflows import certificate as _moved

DEPRECATED_ALIAS = True
warnings.warn(
    "smalti.governance.certificate moved to smalti.workflows.certificate; import it from there",
    DeprecationWarning,
    stacklevel=2,
)
sys.modules[__name__] = _moved
