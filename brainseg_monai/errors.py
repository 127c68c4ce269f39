"""Errors a user can act on: each names the file or folder at fault and the reason."""

from __future__ import annotations

import os


class InputError(ValueError):
    """Bad input data (missing, corrupt, inconsistent). The message always names the path and the reason."""

    def __init__(self, path: str | os.PathLike | None, reason: str) -> None:
        self.path = None if path is None else str(path)
        self.reason = reason
        super().__init__(f"{self.path}: {reason}" if self.path is not None else reason)


def shown_pattern(pattern: str) -> str:
    """A regular expression or glob as a message shows it: as the user types it, in quotes; never Python's repr,
    which doubles every backslash (a user copying the pattern from the message would copy two)."""
    return f"'{pattern}'"


def input_error_in(error: BaseException | None) -> InputError | None:
    """The InputError behind ``error``, if any: MONAI's ``Compose`` re-raises a transform's error as "applying
    transform", so a user's file error can sit several causes deep."""
    seen: set[int] = set()
    while error is not None and id(error) not in seen:
        if isinstance(error, InputError):
            return error
        seen.add(id(error))
        error = error.__cause__ or error.__context__
    return None
