"""Errors the user can fix.

`UsageError` carries one line that names the field, the value and what to do; the CLI prints it
to stderr and exits with code 2. Anything else that escapes is a bug and keeps its traceback.
"""


class UsageError(Exception):
    """Bad input from the user (flag, card, data folder, checkpoint): one line, exit code 2."""


class FplError(Exception):
    """A run-time outcome the harness records rather than crashes on (e.g. a diverged run)."""
