"""Progress bars in bytes, with rates, on standard error; none when that is not a terminal."""

import contextlib
import io
import os
import stat
import sys
from collections.abc import Iterator
from typing import Any, BinaryIO, cast


class _NoBar:
    """What `bar` gives where no bar can show: it counts nothing and costs no tqdm import."""

    def update(self, n: int = 1) -> None:
        pass

    def close(self) -> None:
        pass

    def __enter__(self) -> "_NoBar":
        return self

    def __exit__(self, *exc: object) -> None:
        pass


def bar(what: str, total: int | None, quiet: bool) -> Any:
    """A bar counting bytes up to `total` (None: unknown). It appears only after half a
    second (TQDM_DELAY sets another), so quick work shows nothing, and it is erased when
    closed. None at all with
    `quiet` or when standard error is not a terminal (a pipe, a log, CI)."""
    if quiet or not sys.stderr.isatty():
        return _NoBar()
    from tqdm import tqdm

    # tqdm's monitor is a thread, and a process with a second thread cannot enter a new user
    # namespace (unshare fails with EINVAL), which `rpack run` does after unpacking.
    tqdm.monitor_interval = 0
    # tqdm's own TQDM_* variables override its defaults; rpack's delay gives way to theirs.
    delay = {} if "TQDM_DELAY" in os.environ else {"delay": 0.5}
    return tqdm(total=total, desc=what, file=sys.stderr, unit="B", unit_scale=True,
                unit_divisor=1024, leave=False, dynamic_ncols=True, **delay)


def counting(progress: Any, source: BinaryIO) -> BinaryIO:
    """`source`, its reads counted on `progress`; everything else passes through."""
    if isinstance(progress, _NoBar):
        return source
    from tqdm.utils import CallbackIOWrapper

    return cast(BinaryIO, CallbackIOWrapper(progress.update, source, "read"))


def file_size(source: BinaryIO) -> int | None:
    """The size of a regular file, for a bar's total; None for a pipe."""
    try:
        st = os.fstat(source.fileno())
    except (OSError, ValueError, AttributeError, io.UnsupportedOperation):
        return None
    return st.st_size if stat.S_ISREG(st.st_mode) else None


@contextlib.contextmanager
def reading(source: BinaryIO, what: str, quiet: bool) -> Iterator[tuple[BinaryIO, Any]]:
    """`source` with its reads counted on a bar of its size, and the bar: a caller that must
    print before the end closes it early (closing it again is harmless)."""
    with bar(what, file_size(source), quiet) as progress:
        yield counting(progress, source), progress
