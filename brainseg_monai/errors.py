"""Errors a user can act on: each names the file or folder at fault and the reason."""

from __future__ import annotations

import os


class InputError(ValueError):
    """Bad input data (missing, corrupt, inconsistent). The message always names the path and the reason."""

    def __init__(self, path: str | os.PathLike | None, reason: str) -> None:
        self.path = None if path is None else str(path)
        self.reason = reason
        super().__init__(f"{self.path}: {reason}" if self.path is not None else reason)
