"""The error type of the packer: one line for the user, an optional hint."""


class PackError(Exception):
    """A failure to resolve or pack, worded for the user."""

    def __init__(self, message: str, hint: str | None = None) -> None:
        super().__init__(message)
        self.hint = hint
