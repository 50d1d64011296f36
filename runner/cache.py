"""The cache of unpacked roots: one read-only copy per archive identity, shared by later runs.

It lives in the per-user base of runner.workspace, as BASE/cache (mode 0700):

    sha256-IDENTITY[-setuid]/  an entry: the archive whose tar has that sha256, unpacked
        root/                  the root, the overlay's lower layer: no run ever writes to it
        entry.json             identity, sizes, what the limits are checked against
        stamp.json             the manifest, and the stamp of root/ taken when it was unpacked
    build-XXXX/                an entry being unpacked, renamed to its identity when complete
    trash-XXXX/                an entry being deleted
    keys/DEV-INO-SIZE-MTIME-CTIME -> IDENTITY   which archive file holds which identity

Locks (flock): a run holds LOCK_SH on the directory of the entry it uses, and a build
LOCK_EX on its own, for as long as it lasts; nothing deletes an entry whose lock it cannot take
at once. Renames of entries happen under LOCK_EX on the cache directory, lookups under
LOCK_SH, so a lookup never opens an entry that is being moved away.
"""

import contextlib
import errno
import fcntl
import json
import logging
import os
import re
import secrets
import stat
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any, BinaryIO

from runner import stamp
from runner.cleanup import remove_tree
from runner.errors import RunError
from runner.workspace import create, open_base, sweep, take_lock
from unpacker import Limits, Summary, extract_summary
from unpacker.dirfd import DIR_FLAGS
from unpacker.limits import GiB

log = logging.getLogger(__name__)

CACHE_DIR = "cache"
DEFAULT_SIZE = 4 * GiB

ENTRY_PREFIX = "sha256-"
SETUID_SUFFIX = "-setuid"
BUILD_PREFIX = "build-"
TRASH_PREFIX = "trash-"
KEYS = "keys"
ROOT = "root"
INFO = "entry.json"
STAMP = "stamp.json"
IDENTITY = re.compile("[0-9a-f]{64}")
# What entry.json must hold, each an int (trust_setuid a bool).
COUNTS = ("disk_bytes", "members", "file_bytes", "largest", "depth")

O_NEWFILE = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
O_READFILE = os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC


@dataclass
class Entry:
    """A cached root held by one run: LOCK_SH on its directory, or LOCK_EX while private.

    A private entry is this run's own unpacking, kept out of the cache (too large, or another
    run uses the entry of the same identity) and deleted when released.
    """

    cache: "Cache"
    name: str
    lock: int
    private: bool = False
    info: dict[str, Any] = field(default_factory=dict)
    manifest: dict[str, Any] = field(default_factory=dict)

    @property
    def path(self) -> str:
        return os.path.join(self.cache.path, self.name)

    @property
    def root(self) -> str:
        return os.path.join(self.path, ROOT)

    def check(self) -> str | None:
        """Load the entry's records; say how the root differs from its stamp, None if not."""
        try:
            self.info = read_json(self.lock, INFO)
            recorded = read_json(self.lock, STAMP)
            manifest, records = recorded.get("manifest"), recorded.get("records")
            if not valid_info(self.info) or not isinstance(manifest, dict) \
                    or not isinstance(records, dict):
                return "its records are incomplete"
        except (OSError, ValueError) as e:
            return f"its records are unreadable: {getattr(e, 'strerror', None) or e}"
        self.manifest = manifest
        try:
            root = os.open(ROOT, DIR_FLAGS, dir_fd=self.lock)
            try:
                now = stamp.take(root)
            finally:
                os.close(root)
        except OSError as e:
            return f"{e.filename or 'its root'} cannot be read: {e.strerror}"
        return stamp.Stamp(records, self.info["disk_bytes"]).difference(now)

    def fits(self, limits: Limits) -> bool:
        """Whether the archive stays within limits, judged by the counts taken at unpacking."""
        info = self.info
        return bool(info["members"] <= limits.max_members
                    and info["file_bytes"] <= limits.max_total_bytes
                    and info["largest"] <= limits.max_member_size
                    and info["depth"] <= limits.max_depth)


class Cache:
    """The cache directory, open; see the module's docstring for what is in it."""

    def __init__(self, fd: int, keys: int, path: str, size: int) -> None:
        self.fd = fd
        self.keys = keys
        self.path = path
        self.size = size

    @classmethod
    def open(cls, base: str, size: int = DEFAULT_SIZE) -> "Cache":
        """Open (or create) base/cache; sweep what killed runs left. RunError if unusable."""
        path = os.path.join(base, CACHE_DIR)
        try:
            with contextlib.suppress(FileExistsError):
                os.mkdir(path, 0o700)
            fd = os.open(path, DIR_FLAGS)
        except OSError as e:
            raise RunError(f"cannot use the cache {path}: {e.strerror}") from e
        try:
            st = os.fstat(fd)
            if st.st_uid != os.geteuid():
                raise RunError(f"refusing to use the cache {path}: it belongs to uid {st.st_uid}")
            os.fchmod(fd, 0o700)
            with contextlib.suppress(FileExistsError):
                os.mkdir(KEYS, 0o700, dir_fd=fd)
            keys = os.open(KEYS, DIR_FLAGS, dir_fd=fd)
        except OSError as e:
            os.close(fd)
            raise RunError(f"cannot use the cache {path}: {e.strerror}") from e
        except BaseException:
            os.close(fd)
            raise
        sweep(fd, path, (BUILD_PREFIX, TRASH_PREFIX))
        return cls(fd, keys, path, size)

    def close(self) -> None:
        os.close(self.keys)
        os.close(self.fd)

    @contextlib.contextmanager
    def locked(self, how: int) -> Iterator[None]:
        fcntl.flock(self.fd, how)
        try:
            yield
        finally:
            fcntl.flock(self.fd, fcntl.LOCK_UN)

    # --- a run's entry ----------------------------------------------------------------------

    def acquire(self, source: BinaryIO, limits: Limits, trust_setuid: bool) -> Entry:
        """The root of the archive source reads, for one run; release() it afterwards.

        An archive file seen before (same device, inode, size, mtime and ctime) whose entry is
        intact is not read at all; otherwise it is unpacked, with every check of
        unpacker.extract, into a new entry named by its identity.
        """
        key = quick_key(source)
        if key is not None:
            entry = self.find(key, limits, trust_setuid)
            if entry is not None:
                return entry
        return self.build(source, key, limits, trust_setuid)

    def find(self, key: str, limits: Limits, trust_setuid: bool) -> Entry | None:
        try:
            identity = os.readlink(key, dir_fd=self.keys)
        except OSError:
            return None
        if not IDENTITY.fullmatch(identity):
            return None
        name = entry_name(identity, trust_setuid)
        entry = self.open_entry(name)
        if entry is None:
            return None
        damage = entry.check()
        if damage is None and entry.fits(limits):
            with contextlib.suppress(OSError):
                os.utime(entry.lock)  # its mtime says when it was last used
            log.debug("using the cached root %s", entry.root)
            return entry
        self.release(entry)
        if damage is not None:
            log.warning("the cached root of sha256:%s is damaged (%s): unpacking the archive "
                        "again", identity, damage)
            self.discard(name)
        return None

    def open_entry(self, name: str) -> Entry | None:
        with self.locked(fcntl.LOCK_SH):
            try:
                fd = os.open(name, DIR_FLAGS, dir_fd=self.fd)
            except OSError:
                return None
            try:
                # Under the cache's lock only listing() takes LOCK_EX on an entry, briefly.
                fcntl.flock(fd, fcntl.LOCK_SH)
            except BaseException:
                os.close(fd)
                raise
        return Entry(self, name, fd)

    def build(self, source: BinaryIO, key: str | None, limits: Limits,
              trust_setuid: bool) -> Entry:
        """Unpack source into a new entry and put it in the cache, if it fits and is free."""
        path, lock = create(self.fd, self.path, BUILD_PREFIX)
        entry = Entry(self, os.path.basename(path), lock, private=True)
        try:
            os.mkdir(ROOT, 0o700, dir_fd=lock)
            summary = extract_summary(source, os.path.join(path, ROOT), limits=limits,
                                      trust_setuid=trust_setuid)
            self.record(entry, summary, trust_setuid)
            self.keep(entry, source, key, entry_name(summary.identity, trust_setuid))
        except BaseException:
            self.release(entry)
            raise
        return entry

    def keep(self, entry: Entry, source: BinaryIO, key: str | None, name: str) -> None:
        """Put the freshly unpacked entry into the cache as name, if it fits and name is free."""
        if entry.info["disk_bytes"] > self.size:
            log.info("the root takes %d bytes, more than the cache's limit of %d: not cached",
                     entry.info["disk_bytes"], self.size)
            return
        if not self.install(entry, name):
            return
        # The file must not have changed while it was read.
        if key is not None and key == stat_key(os.fstat(source.fileno())):
            self.remember(key, entry.info["identity"])
        try:
            self.evict(keep=name)
        except (OSError, RunError) as e:
            log.warning("could not evict roots from the cache: %s", e)

    def record(self, entry: Entry, summary: Summary, trust_setuid: bool) -> None:
        """Write the entry's records: its counts, its manifest and the stamp of its root."""
        root = os.open(ROOT, DIR_FLAGS, dir_fd=entry.lock)
        try:
            # A root's own directory is 0755, as a real / is (runner.workspace).
            os.fchmod(root, 0o755)
            taken = stamp.take(root)
        finally:
            os.close(root)
        entries = summary.manifest["entries"]
        entry.info = {
            "identity": summary.identity,
            "trust_setuid": trust_setuid,
            "disk_bytes": taken.disk_bytes,
            "members": summary.members,
            "file_bytes": summary.file_bytes,
            "largest": max((e["size"] for e in entries if e["type"] == "file"), default=0),
            "depth": max((e["path"].count("/") + 1 for e in entries), default=0),
        }
        entry.manifest = summary.manifest
        write_json(entry.lock, STAMP, {"manifest": summary.manifest, "records": taken.records})
        write_json(entry.lock, INFO, entry.info)

    def install(self, entry: Entry, name: str) -> bool:
        """Rename the private entry to name; False if an entry in use holds that name."""
        old, trash = -1, None
        try:
            with self.locked(fcntl.LOCK_EX):
                try:
                    os.rename(entry.name, name, src_dir_fd=self.fd, dst_dir_fd=self.fd)
                except OSError as e:
                    if e.errno not in (errno.EEXIST, errno.ENOTEMPTY):
                        raise
                    # Unpacked meanwhile by a run at the same time, or a damaged entry that
                    # was in use when found: the new one takes its place unless it is in use.
                    old = take_lock(self.fd, name)
                    if old < 0:
                        log.debug("the cached root %s is in use: this run keeps its own copy",
                                  name)
                        return False
                    trash = self.to_trash(name)
                    os.rename(entry.name, name, src_dir_fd=self.fd, dst_dir_fd=self.fd)
                entry.name, entry.private = name, False
                # Shared from now on, like an entry found; the cache's lock keeps evictors
                # away while flock(2) swaps the lock's kind.
                fcntl.flock(entry.lock, fcntl.LOCK_SH)
        except OSError as e:
            log.warning("cannot put the root into the cache: %s", e.strerror)
            return False
        finally:
            if trash:
                self.delete(trash, old)
            elif old >= 0:
                os.close(old)
        return True

    def remember(self, key: str, identity: str) -> None:
        temp = f".{key}.{secrets.token_hex(4)}"
        try:
            os.symlink(identity, temp, dir_fd=self.keys)
            os.rename(temp, key, src_dir_fd=self.keys, dst_dir_fd=self.keys)
        except OSError as e:
            log.debug("cannot remember the archive's identity: %s", e.strerror)
            with contextlib.suppress(OSError):
                os.unlink(temp, dir_fd=self.keys)

    def release(self, entry: Entry) -> None:
        """End a run's use of entry; a private entry is deleted."""
        try:
            if entry.private:
                remove_tree(entry.path)
        finally:
            os.close(entry.lock)

    # --- deleting -----------------------------------------------------------------------------

    def discard(self, name: str) -> None:
        """Delete the entry name unless a run uses it."""
        with self.locked(fcntl.LOCK_EX):
            lock = take_lock(self.fd, name)
            if lock < 0:
                return
            trash = self.to_trash(name)
        self.delete(trash, lock)

    def evict(self, keep: str) -> None:
        """Delete the least recently used entries that no run uses, down to the size limit."""
        victims = []
        with self.locked(fcntl.LOCK_EX):
            entries = self.entries()
            total = sum(size for _, _, size in entries)
            for _, name, size in sorted(entries):
                if total <= self.size:
                    break
                lock = take_lock(self.fd, name) if name != keep else -1
                if lock >= 0:
                    victims.append((self.to_trash(name), lock))
                    total -= size
                    log.info("evicted %s from the cache (%d bytes)", name, size)
            self.prune_keys()
        for trash, lock in victims:
            self.delete(trash, lock)

    def clean(self) -> tuple[int, int]:
        """Delete every entry no run uses; return how many were deleted and how many are used."""
        victims, busy = [], 0
        with self.locked(fcntl.LOCK_EX):
            for name in sorted(os.listdir(self.fd)):
                if not name.startswith((ENTRY_PREFIX, BUILD_PREFIX, TRASH_PREFIX)):
                    continue
                lock = take_lock(self.fd, name)
                if lock < 0:
                    busy += name.startswith(ENTRY_PREFIX)
                    continue
                victims.append((name, self.to_trash(name), lock))
            self.prune_keys()
        for _, trash, lock in victims:
            self.delete(trash, lock)
        return sum(name.startswith(ENTRY_PREFIX) for name, _, _ in victims), busy

    def to_trash(self, name: str) -> str:
        trash = TRASH_PREFIX + secrets.token_hex(8)
        os.rename(name, trash, src_dir_fd=self.fd, dst_dir_fd=self.fd)
        return trash

    def delete(self, trash: str, lock: int) -> None:
        # Still locked, so that no sweeper starts on it too.
        try:
            remove_tree(os.path.join(self.path, trash))
        except RunError as e:
            log.warning("%s", e)
        finally:
            os.close(lock)

    def prune_keys(self) -> None:
        """Forget the archive files whose identity has no entry any more."""
        for key in os.listdir(self.keys):
            try:
                identity = os.readlink(key, dir_fd=self.keys)
            except OSError:
                identity = ""
            if key.startswith(".") or not any(
                    self.exists(entry_name(identity, setuid)) for setuid in (False, True)):
                with contextlib.suppress(OSError):
                    os.unlink(key, dir_fd=self.keys)

    def exists(self, name: str) -> bool:
        try:
            os.stat(name, dir_fd=self.fd, follow_symlinks=False)
        except OSError:
            return False
        return True

    # --- listing ------------------------------------------------------------------------------

    def entries(self) -> list[tuple[float, str, int]]:
        """Each entry's last use (its directory's mtime), name and size on disk."""
        found = []
        for name in os.listdir(self.fd):
            if not name.startswith(ENTRY_PREFIX):
                continue
            used, size = 0.0, 0  # unreadable records: the first to go
            with contextlib.suppress(OSError, ValueError, KeyError, TypeError):
                fd = os.open(name, DIR_FLAGS, dir_fd=self.fd)
                try:
                    used = os.fstat(fd).st_mtime
                    size = int(read_json(fd, INFO)["disk_bytes"])
                finally:
                    os.close(fd)
            found.append((used, name, size))
        return found

    def listing(self) -> list[tuple[str, int, float, bool]]:
        """Each entry's name, size on disk, last use and whether a run uses it; newest first."""
        rows = []
        with self.locked(fcntl.LOCK_SH):
            for used, name, size in sorted(self.entries(), reverse=True):
                lock = take_lock(self.fd, name)
                if lock >= 0:
                    os.close(lock)
                rows.append((name, size, used, lock < 0))
        return rows


def open_cache(tmpdir: str | None, size: int = DEFAULT_SIZE) -> Cache:
    """The cache of the per-user base that runs with this --tmpdir (or $TMPDIR) use."""
    base_fd, base = open_base(tmpdir or os.environ.get("TMPDIR") or "/tmp")
    os.close(base_fd)
    return Cache.open(base, size)


def entry_name(identity: str, trust_setuid: bool) -> str:
    # Roots unpacked with and without setuid bits differ; each has an entry of its own.
    return ENTRY_PREFIX + identity + (SETUID_SUFFIX if trust_setuid else "")


def quick_key(source: BinaryIO) -> str | None:
    """The key of an archive read from a regular file, from its start; None for a pipe."""
    try:
        st = os.fstat(source.fileno())
        start = source.tell() == 0
    except (OSError, ValueError, AttributeError):
        return None
    return stat_key(st) if stat.S_ISREG(st.st_mode) and start else None


def stat_key(st: os.stat_result) -> str:
    # A file rewritten in place gets a new ctime, whatever it does to its mtime.
    fields = (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns)
    return "-".join(f"{value:x}" for value in fields)


def valid_info(info: dict[str, Any]) -> bool:
    return all(type(info.get(name)) is int for name in COUNTS) \
        and isinstance(info.get("trust_setuid"), bool)


def read_json(dir_fd: int, name: str) -> dict[str, Any]:
    """A JSON object from dir_fd/name, never through a link; ValueError if it is not one."""
    fd = os.open(name, O_READFILE, dir_fd=dir_fd)
    with os.fdopen(fd, "rb") as f:
        value = json.load(f)
    if not isinstance(value, dict):
        raise ValueError(f"{name} is not a JSON object")
    return value


def write_json(dir_fd: int, name: str, value: dict[str, Any]) -> None:
    fd = os.open(name, O_NEWFILE, 0o600, dir_fd=dir_fd)
    with os.fdopen(fd, "w") as f:
        json.dump(value, f)
