"""Where an archive is read from: a file by name, or standard input for "-"."""

import contextlib
import sys
from collections.abc import Iterator
from typing import BinaryIO

from unpacker.errors import UnpackError, reason


@contextlib.contextmanager
def open_archive(path: str) -> Iterator[BinaryIO]:
    """Yield the archive `path` opened for reading; "-" is standard input, left open after."""
    if path == "-":
        yield sys.stdin.buffer
        return
    try:
        f = open(path, "rb")
    except OSError as exc:
        raise UnpackError(f"cannot open {path!r}: {reason(exc)}") from None
    with f:
        yield f
