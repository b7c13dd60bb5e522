"""Errors a user can fix. The launcher prints them as one line and exits with status 2."""


class UserError(ValueError):
    """Bad input: the message says what is wrong and what to do."""
