"""The one error type a command raises for a user mistake."""

from __future__ import annotations

from pydantic import ValidationError


class CommandError(Exception):
    """A failure to report as one line, without a traceback (exit status 1 by default)."""

    def __init__(self, message: str, status: int = 1) -> None:
        super().__init__(message)
        self.status = status


def settings_error(exc: ValidationError) -> CommandError:
    """One line naming every bad setting (env var or option) and what is wrong with it."""
    problems = "; ".join(f"{'.'.join(str(p) for p in e['loc'])}: {e['msg']}" for e in exc.errors())
    return CommandError(f"invalid settings: {problems}")
