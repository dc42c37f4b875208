"""Errors a user can act on. The CLI prints them as one line and exits non-zero."""


class TesseraError(Exception):
    """Base class: the message is complete and names the file, key or example at fault."""

    exit_code = 1


class RecipeError(TesseraError):
    """A recipe or ``--set`` override is invalid."""

    exit_code = 2


class CheckpointError(TesseraError):
    """A checkpoint is missing, corrupt, or does not fit this run."""


class DataError(TesseraError):
    """Training data is missing, malformed, or fails verification."""
