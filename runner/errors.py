"""The runner's one error: rpack could not run the program (the CLI exits 125)."""


class RunError(Exception):
    """rpack could not run the program; the CLI prints it, and the hint, and exits 125."""

    def __init__(self, message: str, hint: str | None = None) -> None:
        super().__init__(message)
        self.hint = hint
