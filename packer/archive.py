"""The archive writer: the manifest first, then every member, as one zstd-compressed pax tar."""

from __future__ import annotations

import contextlib
import errno
import hashlib
import io
import json
import os
import sys
import tarfile
import tempfile
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, BinaryIO, Protocol

import zstandard

from unpacker.format import MANIFEST_PATH, WINDOW_LOG_MAX

from .errors import PackError
from .plan import Member

CHUNK = 1 << 20
_TYPES = {"dir": tarfile.DIRTYPE, "file": tarfile.REGTYPE, "symlink": tarfile.SYMTYPE,
          "hardlink": tarfile.LNKTYPE}


@dataclass(frozen=True)
class Hashed:
    """A file member's sha256, and for a host file its stamp (`stamp`) when it was hashed."""

    sha256: str
    stamp: tuple[int, ...] | None


def stamp(st: os.stat_result) -> tuple[int, ...]:
    """What any change to a file changes, as GNU tar checks it: its inode, size and times."""
    return st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns


def hash_sources(members: list[Member],
                 progress: Callable[[int], object] | None = None) -> dict[str, Hashed]:
    """The sha256 of every file member, which the manifest lists before the data follows;
    `progress` is told the size of each file hashed.

    The files are shared out among one thread per core, in lists of about equal bytes
    (reading and hashing both run outside the GIL; a future per file costs more than it
    gains on small files)."""
    files = [m for m in members if m.type == "file"]
    shares: list[list[Member]] = [[] for _ in range(os.cpu_count() or 1)]
    loads = [0] * len(shares)
    for m in sorted(files, key=lambda m: m.size, reverse=True):
        least = loads.index(min(loads))
        shares[least].append(m)
        loads[least] += m.size
    with ThreadPoolExecutor(len(shares)) as pool:
        done = pool.map(lambda share: [(m.path, _hash(m, progress)) for m in share], shares)
        hashed = dict(pair for share in done for pair in share)
    return {m.path: hashed[m.path] for m in files}


def _hash(m: Member, progress: Callable[[int], object] | None) -> Hashed:
    if m.data is not None:
        return Hashed(hashlib.sha256(m.data).hexdigest(), None)
    assert m.source is not None
    try:
        with open(m.source, "rb", buffering=0) as f:
            st = os.fstat(f.fileno())
            if st.st_size != m.size:
                raise PackError(f"{m.source!r} changed while it was being packed")
            # file_digest reads into one buffer: no new 1 MiB object (and its page faults)
            # for every chunk.
            digest = hashlib.file_digest(f, "sha256").hexdigest()
    except OSError as e:
        raise PackError(f"cannot read {m.source!r}: {e.strerror}") from None
    if progress is not None:
        progress(m.size)
    return Hashed(digest, stamp(st))


def manifest_entries(members: list[Member], digests: dict[str, Hashed]) -> list[dict[str, Any]]:
    entries = []
    for m in members:
        entry: dict[str, Any] = {"path": m.path, "type": m.type, "mode": m.mode,
                                 "origin": m.origin}
        if m.type == "file":
            entry["size"] = m.size
            entry["sha256"] = digests[m.path].sha256
        elif m.type in ("symlink", "hardlink"):
            entry["target"] = m.target
        entries.append(entry)
    return entries


class ReadsInto(Protocol):
    """A file that reads into a buffer it is given (raw and buffered files, BytesIO)."""

    def readinto(self, buffer: memoryview, /) -> int | None: ...


class TarWriter:
    """Writes pax tar members straight to a sink; with `identity`, hashes the stream too.

    tarfile's stream mode copies every block through its own buffer; writing the headers it
    builds (TarInfo.tobuf) and the data ourselves keeps large files to one copy per chunk.
    `progress`, if given, is told the size of each chunk of member data written.
    """

    def __init__(self, sink: BinaryIO, progress: Callable[[int], object] | None = None,
                 identity: bool = False) -> None:
        self.sink = sink
        self.progress = progress
        self.digest = hashlib.sha256() if identity else None
        self.size = 0
        self._view = memoryview(bytearray(CHUNK))

    def write(self, data: bytes | memoryview) -> None:
        if self.digest is not None:
            self.digest.update(data)
        self.sink.write(data)
        self.size += len(data)

    def add(self, info: tarfile.TarInfo, data: ReadsInto | None = None) -> None:
        """Write one member, its data read from `data`."""
        self.write(ustar_header(info) or info.tobuf(tarfile.PAX_FORMAT, "utf-8",
                                                   "surrogateescape"))
        left = info.size
        while left > 0:
            assert data is not None
            # Into one buffer, not a new object for every chunk.
            read = data.readinto(self._view[:min(CHUNK, left)])
            if not read:
                raise PackError(f"{getattr(data, 'name', info.name)!r} changed while it was "
                                "being packed")
            self.write(self._view[:read])
            left -= read
            if self.progress is not None:
                self.progress(read)
        if info.size % tarfile.BLOCKSIZE:
            self.write(tarfile.NUL * (tarfile.BLOCKSIZE - info.size % tarfile.BLOCKSIZE))

    def close(self) -> None:
        # Two zero blocks end the archive; the whole is padded to a record, as tar does.
        self.write(tarfile.NUL * (2 * tarfile.BLOCKSIZE))
        if self.size % tarfile.RECORDSIZE:
            self.write(tarfile.NUL * (tarfile.RECORDSIZE - self.size % tarfile.RECORDSIZE))


USTAR_MAGIC = b"ustar\x0000"


def ustar_header(info: tarfile.TarInfo) -> bytes | None:
    """The header block tarfile writes for a member that needs no pax record, built directly
    (tarfile takes some 35 microseconds a member); None for any other member."""
    name = info.name + "/" if info.type == tarfile.DIRTYPE and not info.name.endswith("/") \
        else info.name
    if (not name.isascii() or not info.linkname.isascii() or len(name) > 100
            or len(info.linkname) > 100 or info.uid or info.gid or info.uname or info.gname
            or info.pax_headers or not isinstance(info.mtime, int)
            or not 0 <= info.size < 8**11 or not 0 <= info.mtime < 8**11):
        return None
    block = bytearray(tarfile.BLOCKSIZE)
    block[0:len(name)] = name.encode("ascii")
    block[100:108] = b"%07o\0" % (info.mode & 0o7777)
    block[108:124] = b"0000000\0" * 2  # uid, gid
    block[124:136] = b"%011o\0" % info.size
    block[136:148] = b"%011o\0" % info.mtime
    block[148:156] = b" " * 8  # the checksum counts its own field as spaces
    block[156:157] = info.type
    block[157:157 + len(info.linkname)] = info.linkname.encode("ascii")
    block[257:265] = USTAR_MAGIC
    block[148:155] = b"%06o\0" % sum(block)
    return bytes(block)


def manifest_bytes(manifest: dict[str, Any]) -> bytes:
    """The manifest's JSON: sorted keys, an entry a line. Each entry goes through json's C
    encoder (indent= would take the pure Python one for the whole manifest)."""
    marker = "\0entries\0"  # no manifest string holds a NUL
    head = json.dumps({**manifest, "entries": marker}, sort_keys=True, indent=1,
                      ensure_ascii=False)
    lines = ",\n  ".join(json.dumps(entry, sort_keys=True, ensure_ascii=False)
                         for entry in manifest["entries"])
    return head.replace(json.dumps(marker), f"[\n  {lines}\n ]", 1).encode()


def compressor(level: int = 3, threads: int = 0) -> zstandard.ZstdCompressor:
    """zstd as archives use it: a checksum in every frame, windows the zstd CLI reads, and the
    same bytes for any thread count (`threads` 0 means one per core)."""
    # Any thread count >= 1 gives the same bytes; 0 (single-threaded mode) would not.
    params = zstandard.ZstdCompressionParameters.from_level(
        level, threads=threads or os.cpu_count() or 1, write_checksum=True,
        write_content_size=False)
    # Levels up to 22 stay within windowLog 27 unless long mode is asked for, which it is not.
    assert params.window_log <= WINDOW_LOG_MAX
    return zstandard.ZstdCompressor(compression_params=params)


def write_archive(out: BinaryIO, manifest: dict[str, Any], members: list[Member],
                  digests: dict[str, Hashed], mtime: int, level: int = 3, threads: int = 0,
                  progress: Callable[[int], object] | None = None,
                  identity: bool = False) -> tuple[str | None, int]:
    """Write the archive to `out`; return its identity (the sha256 of the tar, if `identity`
    asks for it: a pass over every byte) and the tar's size. `progress` is told the size of
    each chunk of file data written."""
    with compressor(level, threads).stream_writer(out, closefd=False,
                                                  write_size=CHUNK) as zstd_out:
        tar = TarWriter(zstd_out, progress, identity)
        data = manifest_bytes(manifest)
        tar.add(tarinfo(MANIFEST_PATH, tarfile.REGTYPE, 0o644, mtime, len(data)),
                io.BytesIO(data))
        for m in members:
            _add(tar, m, digests)
        tar.close()
    return tar.digest.hexdigest() if tar.digest else None, tar.size


def tarinfo(name: str, kind: bytes, mode: int, mtime: int, size: int = 0,
            linkname: str = "") -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.type = kind
    info.mode = mode
    info.mtime = mtime
    info.size = size
    info.linkname = linkname
    info.uid = info.gid = 0
    info.uname = info.gname = ""
    return info


def _add(tar: TarWriter, m: Member, digests: dict[str, Hashed]) -> None:
    assert m.mtime is not None
    info = tarinfo(m.path, _TYPES[m.type], m.mode, m.mtime, m.size, m.target)
    if m.type != "file":
        tar.add(info)
    elif m.data is not None:
        tar.add(info, io.BytesIO(m.data))
    else:
        assert m.source is not None
        try:
            with open(m.source, "rb", buffering=0) as f:
                tar.add(info, f)
                # The data just written is the data hashed if nothing changed the file since.
                changed = stamp(os.fstat(f.fileno())) != digests[m.path].stamp
        except OSError as e:
            raise PackError(f"cannot read {m.source!r}: {e.strerror}") from None
        if changed:
            raise PackError(f"{m.source!r} changed while it was being packed")


@contextlib.contextmanager
def open_output(path: str, force: bool) -> Iterator[BinaryIO]:
    """The archive's output: stdout for "-", else a file that appears only once complete."""
    if path == "-":
        if sys.stdout.isatty():
            raise PackError("refusing to write an archive to a terminal",
                            hint="redirect standard output to a file or a pipe")
        yield sys.stdout.buffer
        sys.stdout.buffer.flush()
        return
    if os.path.lexists(path):
        if not force:
            raise PackError(f"{path!r} already exists", hint="use -f to overwrite it")
        if not os.path.isfile(path) or os.path.islink(path):
            raise PackError(f"{path!r} is not a regular file; -f replaces only a regular file",
                            hint="write to standard output with - and redirect it instead")
    directory = os.path.dirname(os.path.abspath(path))
    # An unnamed file in the output's directory, so that a killed create leaves nothing
    # behind; naming it at the end takes its /proc/self/fd link.
    fd = None
    if os.path.isdir("/proc/self/fd"):
        try:
            fd = os.open(directory, os.O_TMPFILE | os.O_WRONLY | os.O_CLOEXEC, 0o666)
        except OSError as e:
            if e.errno not in (errno.EOPNOTSUPP, errno.EISDIR, errno.EINVAL):
                raise PackError(f"cannot create {path!r}: {e.strerror}") from None
    if fd is None:
        with _named_output(path, directory, force) as f:
            yield f
        return
    with os.fdopen(fd, "wb") as f:
        yield f
        f.flush()
        _link_into_place(f.fileno(), path, directory, force)


def _link_into_place(fd: int, path: str, directory: str, force: bool) -> None:
    """Name the finished unnamed file. link() fails if the name appeared meanwhile, so only -f
    replaces a file, through a temporary name renamed over it."""
    try:
        directory_fd = os.open(directory, os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
    except OSError as e:
        raise PackError(f"cannot create {path!r}: {e.strerror}") from None
    try:
        if not force:
            _link(fd, directory_fd, path, os.path.basename(path))
            return
        temporary = f".rpack-{os.urandom(8).hex()}.part"
        _link(fd, directory_fd, path, temporary)
        try:
            os.replace(temporary, os.path.basename(path), src_dir_fd=directory_fd,
                       dst_dir_fd=directory_fd)
        except BaseException:
            with contextlib.suppress(OSError):
                os.unlink(temporary, dir_fd=directory_fd)
            raise
    finally:
        os.close(directory_fd)


def _link(fd: int, directory_fd: int, path: str, name: str) -> None:
    # A destination directory fd makes os.link use linkat(AT_SYMLINK_FOLLOW), which links the
    # file behind the /proc link; plain link() would try to link the /proc link itself.
    try:
        os.link(f"/proc/self/fd/{fd}", name, dst_dir_fd=directory_fd, follow_symlinks=True)
    except FileExistsError:
        raise PackError(f"{path!r} already exists", hint="use -f to overwrite it") from None
    except OSError as e:
        raise PackError(f"cannot create {path!r}: {e.strerror}") from None


@contextlib.contextmanager
def _named_output(path: str, directory: str, force: bool) -> Iterator[BinaryIO]:
    """The output through a named temporary file, where the file system has no O_TMPFILE."""
    try:
        fd, temporary = tempfile.mkstemp(prefix=".rpack-", suffix=".part", dir=directory)
    except OSError as e:
        raise PackError(f"cannot create {path!r}: {e.strerror}") from None
    try:
        with os.fdopen(fd, "wb") as f:
            yield f
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(temporary, 0o666 & ~umask)
        if force:
            os.replace(temporary, path)
        else:
            # link() fails if the name appeared meanwhile: never overwrite without -f.
            os.link(temporary, path)
            os.unlink(temporary)
    except FileExistsError:
        os.unlink(temporary)
        raise PackError(f"{path!r} already exists", hint="use -f to overwrite it") from None
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(temporary)
        raise
