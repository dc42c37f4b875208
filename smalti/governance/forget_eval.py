"""Deprecated: moved to ``smalti.workflows.forget_eval``. This alias is kept for one release (removed in 0.3)."""

import sys
import warnings

from smalti.workflows import forget_eval as _moved

DEPRECATED_ALIAS = True
warnings.warn(
    "smalti.governance.forget_eval moved to smalti.workflows.forget_eval; import it from there",
    DeprecationWarning,
    stacklevel=2,
)
sys.modules[__name__] = _moved
