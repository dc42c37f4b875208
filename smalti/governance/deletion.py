"""Deprecated: moved to ``smalti.workflows.deletion`` (the steps) and ``smalti.workflows.forget`` (``forget``).
This alias is kept for one release (removed in 0.3)."""

import warnings

from smalti.workflows.deletion import *  # noqa: F401,F403
from smalti.workflows.deletion import DeletionError, DeletionPlan, loss_by_class, plan_deletion  # noqa: F401
from smalti.workflows.forget import forget  # noqa: F401

DEPRECATED_ALIAS = True
warnings.warn(
    "smalti.governance.deletion moved to smalti.workflows.deletion (forget: smalti.workflows.forget)",
    DeprecationWarning,
    stacklevel=2,
)
