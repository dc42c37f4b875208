"""Errors a user can act on. The CLI prints them as one line and exits non-zero."""


class SmaltiError(Exception):
    """Base class: the message is complete and names the file, key or example at fault."""

    exit_code = 1


class RecipeError(SmaltiError):
    """A recipe or ``--set`` override is invalid."""

    exit_code = 2


class CheckpointError(SmaltiError):
    """A checkpoint is missing, corrupt, or does not fit this run."""


class CheckpointCorrupt(CheckpointError):
    """A checkpoint's bytes are gone, cut short or changed: an accident an older checkpoint can stand in for."""


class DataError(SmaltiError):
    """Training data is missing, malformed, or fails verification."""
