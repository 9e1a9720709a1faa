"""The one error type a command raises for a user mistake."""

from __future__ import annotations


class CommandError(Exception):
    """A failure to report as one line, without a traceback (exit status 1 by default)."""

    def __init__(self, message: str, status: int = 1) -> None:
        super().__init__(message)
        self.status = status
