"""The error training code raises; only a command's ``run()`` turns it into an exit status."""

from __future__ import annotations


class TrainingError(RuntimeError):
    """Training cannot start or go on: bad arguments, a bad checkpoint, a diverging loss."""
