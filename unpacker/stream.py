"""One checked pass over an archive: the reader behind extract, verify, list and inspect."""

import contextlib
import hashlib
import io
import os
import queue
import stat
import threading
from collections.abc import Callable, Generator, Iterator
from dataclasses import dataclass
from typing import BinaryIO

import zstandard

from unpacker.decompress import FrameChecker, open_stream
from unpacker.errors import UnpackError, reason
from unpacker.format import MANIFEST_MAX_SIZE, MANIFEST_PATH
from unpacker.host import check_platform
from unpacker.limits import Limits
from unpacker.manifest import Entry, Manifest, ManifestCheck, parse_manifest
from unpacker.read import CHUNK as READ_CHUNK
from unpacker.read import Kind, Member, TarReader


@dataclass(frozen=True)
class Item:
    """A member that passed every check so far, as a consumer sees it.

    `entry` is the member's manifest entry (None for the manifest itself). `data` yields a
    file's bytes and refuses, after the last chunk, if their sha256 is not the entry's; what a
    consumer leaves unread is read (and checked) before the next item. `parents` counts the
    leading directories of the path that earlier members made; deeper ones are new. `repeat`
    is True for a directory the archive already made.
    """

    member: Member
    entry: Entry | None
    data: Iterator[bytes]
    parents: int
    repeat: bool


class ArchiveReader:
    """Reads an archive front to back, refusing at the first fault; iterate it once.

    The checks, in stream order: zstd frames (unpacker.decompress), tar headers, types, sizes
    and names (unpacker.read), the manifest as the first member (unpacker.manifest), the
    platform against this host unless `check_platform` is False (unpacker.host), then per
    member the tree model (no duplicates, nothing below a symlink or a file, hard links only
    to earlier files) and its manifest entry, and at the end the end-of-archive marker, nothing
    but zeros after it, the last frame complete, and every manifest entry seen.

    Once iteration has ended without an error, `manifest`, `identity` (the sha256 of the
    uncompressed tar stream), `members`, `tar_bytes` and `compressed_bytes` describe the
    archive. Faults that are not UnpackError already become one, naming the member at hand.

    `tar_sink`, if given, is handed every byte of the uncompressed tar stream in order as it
    is read, end-of-archive padding included: the bytes whose sha256 is `identity`. On a
    refusal it has seen only part of them, checked or not, and the caller must discard them.
    """

    def __init__(self, source: BinaryIO, limits: Limits | None = None, *,
                 check_platform: bool = True,
                 tar_sink: Callable[[bytes], object] | None = None) -> None:
        self._source = source
        self._limits = limits or Limits()
        self._check_platform = check_platform
        self._tar_sink = tar_sink
        self._tree = _Tree()
        self._current: Member | None = None
        self.manifest: Manifest | None = None
        self.identity: str | None = None
        self.members = 0
        self.tar_bytes = 0
        self.compressed_bytes = 0

    def __iter__(self) -> Iterator[Item]:
        checker = FrameChecker(self._source)
        try:
            with _TarStream(checker, self._tar_sink, _regular_file(self._source)) as tar:
                reader = TarReader(tar, self._limits)
                check = yield from self._items(reader)
                self._current = None
                reader.finish()
            checker.check_complete()
            check.finish()
        except UnpackError as exc:
            exc.of_archive = exc.member is None
            raise
        except Exception as exc:
            member = self._current.name if self._current else None
            raise UnpackError(reason(exc), member) from exc
        self.identity = tar.digest.hexdigest()
        self.tar_bytes = tar.size
        self.compressed_bytes = checker.compressed_bytes

    def _items(self, reader: TarReader) -> Generator[Item, None, ManifestCheck]:
        members = iter(reader)
        # A "./" entry names the root itself: nothing to check or create, here or later.
        first = next((member for member in members if member.path), None)
        manifest, data = self._manifest(reader, first)
        assert first is not None
        self.manifest = manifest
        check = ManifestCheck(manifest)
        parents, repeat = self._tree.add(first)
        self.members += 1
        yield Item(first, None, iter([data]), parents, repeat)

        for member in members:
            if not member.path:
                continue
            self._current = member
            parents, repeat = self._tree.add(member)
            entry = check.match(member)
            data_chunks = check.data(member, entry, reader.data())
            self.members += 1
            yield Item(member, entry, data_chunks, parents, repeat)
            for _ in data_chunks:
                pass
        return check

    def _manifest(self, reader: TarReader, first: Member | None) -> tuple[Manifest, bytes]:
        if first is None:
            raise UnpackError("archive has no manifest")
        self._current = first
        if first.path != MANIFEST_PATH:
            raise UnpackError(f"first member must be {MANIFEST_PATH!r}", first.name)
        if first.kind is not Kind.FILE:
            raise UnpackError("manifest must be a regular file", first.name)
        if first.size > MANIFEST_MAX_SIZE:
            raise UnpackError(f"manifest larger than {MANIFEST_MAX_SIZE} bytes", first.name)
        data = b"".join(reader.data())
        manifest = parse_manifest(data, first.name, self._limits.max_members)
        if self._check_platform:
            check_platform(manifest.platform)
        return manifest, data

def _regular_file(source: BinaryIO) -> bool:
    try:
        return stat.S_ISREG(os.fstat(source.fileno()).st_mode)
    except (OSError, ValueError, AttributeError, io.UnsupportedOperation):
        return False


class _TarStream:
    """The uncompressed tar stream of the frames `checker` passes; read from a regular file, it
    is decompressed in a thread of its own at most DEPTH chunks ahead of its reader.

    Producing a chunk decompresses it, hashes it (the archive's identity, in `digest` and
    `size`) and hands it to `sink` if there is one, all of which runs outside the GIL: in the
    thread, while the reader checks members and writes files, two cores work, as tar piped
    from zstd uses. What the thread meets (a refused frame, corrupt data) is raised to the
    reader at the point of the stream where it happened; the zstd stream is the thread's alone,
    and by the time the reader gets b"" the thread has ended. A pipe is read in the reader's
    thread: a read of a pipe may block for as long as the sender likes, and a thread blocked so
    would keep rpack from ending when it refuses the archive.
    """

    DEPTH = 4

    def __init__(self, checker: FrameChecker, sink: Callable[[bytes], object] | None,
                 threaded: bool) -> None:
        self._checker = checker
        self._sink = sink
        self.digest = hashlib.sha256()
        self.size = 0
        self._stream: zstandard.ZstdDecompressionReader | None = None
        self._closing = contextlib.ExitStack()
        self._thread = threading.Thread(target=self._fill, name="rpack-tar-stream",
                                        daemon=True) if threaded else None
        self._queue: queue.Queue[bytes | BaseException] = queue.Queue(self.DEPTH)
        self._stop = threading.Event()
        self._chunk = b""
        self._at = 0
        self._ended = False

    def __enter__(self) -> "_TarStream":
        if self._thread is not None:
            self._thread.start()
        else:
            self._stream = self._closing.enter_context(open_stream(self._checker))
        return self

    def __exit__(self, *exc: object) -> None:
        if self._thread is not None:
            self._stop.set()
            self._thread.join(timeout=1)
        self._closing.close()

    def _pass(self, data: bytes) -> bytes:
        """Hash a chunk produced and hand it to the sink."""
        self.digest.update(data)
        self.size += len(data)
        if self._sink is not None and data:
            self._sink(data)
        return data

    def _fill(self) -> None:
        try:
            with open_stream(self._checker) as stream:
                while not self._stop.is_set():
                    data = stream.read(READ_CHUNK)
                    if self._stop.is_set():
                        return  # the reader has gone, and the sink may be closed
                    self._put(self._pass(data))
                    if not data:
                        return
        except BaseException as exc:  # raised in the reader's thread instead
            self._put(exc)

    def _put(self, item: bytes | BaseException) -> None:
        while not self._stop.is_set():
            try:
                self._queue.put(item, timeout=0.1)
                return
            except queue.Full:
                continue

    def _next(self) -> bytes:
        if self._thread is None:
            assert self._stream is not None
            return self._pass(self._stream.read(READ_CHUNK))
        item = self._queue.get()
        if isinstance(item, BaseException):
            raise item
        if not item:
            self._thread.join()
        return item

    def read(self, size: int = -1, /) -> bytes:
        if self._at == len(self._chunk):
            if self._ended:
                return b""
            try:
                item = self._next()
            except BaseException:
                self._ended = True
                raise
            if not item:
                self._ended = True
                return b""
            self._chunk, self._at = item, 0
        end = len(self._chunk) if size < 0 else min(len(self._chunk), self._at + size)
        data = self._chunk[self._at:end]
        self._at = end
        return data


class _Tree:
    """What the archive has made so far, by normalised path: the model every check uses."""

    def __init__(self) -> None:
        self.kinds: dict[str, Kind] = {}  # hard links are recorded as the files they are

    def add(self, member: Member) -> tuple[int, bool]:
        """Refuse `member` if it clashes with the tree, else record it with its parents.

        Returns how many leading parent directories existed already, and whether the member
        repeats a directory.
        """
        parts = member.parts
        existing = 0
        for depth in range(1, len(parts)):
            prefix = "/".join(parts[:depth])
            kind = self.kinds.get(prefix)
            if kind is None:
                break  # nor will any deeper prefix exist: parents are recorded first
            if kind is Kind.SYMLINK:
                raise UnpackError(f"would be created through symlink {prefix!r}", member.name)
            if kind is not Kind.DIR:
                raise UnpackError(f"would be created below file {prefix!r}", member.name)
            existing = depth

        kind = self.kinds.get(member.path)
        repeat = kind is Kind.DIR and member.kind is Kind.DIR
        if kind is not None and not repeat:
            raise UnpackError(f"duplicate member refused (already a {kind.value})", member.name)
        if member.kind is Kind.HARDLINK and self.kinds.get(member.linkname) is not Kind.FILE:
            raise UnpackError(
                f"hardlink target {member.linkname!r} is not an earlier regular file", member.name
            )

        for depth in range(existing + 1, len(parts)):
            self.kinds["/".join(parts[:depth])] = Kind.DIR
        self.kinds[member.path] = Kind.FILE if member.kind is Kind.HARDLINK else member.kind
        return existing, repeat
