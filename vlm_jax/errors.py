"""Errors a user can fix. The launcher prints them as one line and exits with status 2."""


class UserError(ValueError):
    """Bad input: the message says what is wrong and what to do."""


class CheckpointError(UserError):
    """A checkpoint is missing, incomplete, corrupt or does not match the model."""
