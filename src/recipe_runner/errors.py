"""Errors a user can act on.

Anything the user can fix (a bad recipe key, a missing file, a malformed data row) is raised as
`UserError`; the CLI prints its message without a traceback and exits with its code (2 by
default). Everything else is a bug and keeps its traceback.
"""

from __future__ import annotations


class UserError(Exception):
    """A failure the user can fix. The message says what is wrong, where, and what to do."""

    def __init__(self, message: str, exit_code: int = 2):
        super().__init__(message)
        self.message = message
        self.exit_code = exit_code

    def __str__(self) -> str:
        return self.message
