"""The one error the unpacker raises: an archive refused, or an extraction that failed."""

import errno


class UnpackError(Exception):
    """An archive was refused or could not be extracted.

    `member` is the archive member at fault, as the archive spells it, or None when the fault
    lies with the archive as a whole (truncated stream, trailing data, destination unusable).
    `reason` is a lowercase fragment; `str()` joins the two into one line.
    """

    def __init__(self, reason: str, member: str | None = None) -> None:
        self.reason = " ".join(reason.split())
        self.member = member
        # Set by the reader for a fault of the archive as a whole, which the message should
        # then name: the reader has no name for it.
        self.of_archive = False
        super().__init__(str(self))

    def __str__(self) -> str:
        if self.member is None:
            return self.reason
        return f"member {self.member!r}: {self.reason}"


def reason(exc: BaseException) -> str:
    """A lowercase fragment saying what went wrong, for an exception that is not ours."""
    if isinstance(exc, OSError):
        if exc.errno == errno.EEXIST:
            return "name collision with an existing entry"
        return (exc.strerror or str(exc)).lower()
    if isinstance(exc, MemoryError):
        return "out of memory"
    return f"internal error ({type(exc).__name__}: {exc})"
