"""The error types of the packer: one line for the user, an optional hint."""

from __future__ import annotations

from typing import Any


class PackError(Exception):
    """A failure to resolve or pack, worded for the user."""

    def __init__(self, message: str, hint: str | None = None) -> None:
        super().__init__(message)
        self.hint = hint


class MissingLibraries(PackError):
    """Libraries no search finds; `report` is what `rpack deps --json` would have printed."""

    def __init__(self, message: str, hint: str | None, report: dict[str, Any]) -> None:
        super().__init__(message, hint)
        self.report = report
