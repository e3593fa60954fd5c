"""Errors meant for users: the CLI prints them as one line, the add-on as a report."""


class UserError(Exception):
    """A problem the user can fix (bad input, missing file, mismatched model). No traceback."""


def read_json(path, what: str):
    """A JSON file's content, or a ``UserError`` naming ``what`` it should have been."""
    import json
    from pathlib import Path
    path = Path(path)
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise UserError(f"{what} not found: {path}") from None
    except (OSError, ValueError) as e:
        raise UserError(f"{path}: unreadable {what} ({type(e).__name__}: {e})") from None
