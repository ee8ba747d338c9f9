"""User-facing errors: anything a user can fix. The CLI prints them without a traceback and exits 2."""


class UserError(Exception):
    """Base of errors whose message tells the user what to change."""
