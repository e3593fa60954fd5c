"""Errors meant for users: the CLI prints them as one line, the add-on as a report."""


class UserError(Exception):
    """A problem the user can fix (bad input, missing file, mismatched model). No traceback."""
