"""The one error type a command raises for a user mistake."""

from __future__ import annotations

from pydantic import ValidationError
from pydantic_core import ErrorDetails


class CommandError(Exception):
    """A failure to report as one line, without a traceback (exit status 1 by default)."""

    def __init__(self, message: str, status: int = 1) -> None:
        super().__init__(message)
        self.status = status


def settings_error(exc: ValidationError) -> CommandError:
    """One line naming every bad setting (env var or option) and what is wrong with it."""
    problems = "; ".join(_problem(error) for error in exc.errors())
    return CommandError(f"invalid settings: {problems}")


def _problem(error: ErrorDetails) -> str:
    message = str(error["msg"]).removeprefix("Value error, ")
    where = ".".join(str(part) for part in error["loc"])
    return f"{where}: {message}" if where else message
