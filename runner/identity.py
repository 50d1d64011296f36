"""The root's /etc at run time: passwd and group entries, and the host's resolv.conf and hosts."""

import contextlib
import errno
import logging
import os
import pwd
import stat

from runner import linux
from runner.mounts import O_PATHANY, O_PATHDIR, Bind, fd_path, mount_on, restrict_bind

log = logging.getLogger(__name__)

# Read-only from the host unless --no-host-files: what name resolution needs.
HOST_FILES = ("resolv.conf", "hosts")
# When the host has no /etc/hosts and the archive none either: localhost still resolves.
DEFAULT_HOSTS = "127.0.0.1\tlocalhost\n::1\tlocalhost ip6-localhost ip6-loopback\n"
# How much of an archive's own passwd or group is read to look for its root entry.
READ_LIMIT = 1 << 20

O_NEWFILE = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC


def invoker() -> str:
    """The invoking user's name on the host (its uid if it has none); read before the sandbox."""
    uid = os.getuid()
    try:
        return pwd.getpwuid(uid).pw_name
    except KeyError:
        return str(uid)


def identity_files(user: str) -> dict[str, tuple[str, str]]:
    """passwd and group as generated: each name's content, and the root entry alone.

    The program runs as uid 0 and gid 0: as root, or as the invoking user mapped to 0 in a user
    namespace. Either way it is called root, the name programs expect for uid 0; the comment
    field names the invoking user. nobody and nogroup name what the sandbox cannot map.
    """
    user = "".join(c for c in user if c.isprintable() and c not in ":,")
    comment = "root" if user == "root" else f"root ({user} on the host)"
    root_user = f"root:x:0:0:{comment}:/:/bin/sh\n"
    root_group = "root:x:0:\n"
    return {
        "passwd": (root_user + "nobody:x:65534:65534:nobody:/nonexistent:/usr/sbin/nologin\n",
                   root_user),
        "group": (root_group + "nogroup:x:65534:\n", root_group),
    }


def prepare_etc(newroot: int, user: str, host_files: bool) -> list[str]:
    """Give the root an /etc/passwd and /etc/group, and the host's resolv.conf and hosts.

    Runs in the sandbox's mount namespace before pivot_root and before the user's binds, so
    everything goes through descriptors below newroot that follow no link of the archive.
    Returns warnings about what was left out; RunError if a mount fails.
    """
    etc = open_etc(newroot)
    if isinstance(etc, str):
        return [etc]
    warnings: list[str] = []
    try:
        for name, (content, root_entry) in identity_files(user).items():
            warning = write_identity(etc, name, content, root_entry)
            if warning:
                warnings.append(warning)
        if host_files:
            for name in HOST_FILES:
                warning = bind_host_file(etc, name)
                if warning:
                    warnings.append(warning)
    finally:
        os.close(etc)
    return warnings


def open_etc(newroot: int) -> int | str:
    """The root's etc directory (created if missing), or a warning why it cannot be used."""
    with contextlib.suppress(FileExistsError):
        os.mkdir("etc", 0o755, dir_fd=newroot)
    try:
        return os.open("etc", O_PATHDIR, dir_fd=newroot)
    except OSError as e:
        try:
            what = f"a symlink to {os.readlink('etc', dir_fd=newroot)}"
        except OSError:
            what = "not a directory" if e.errno == errno.ENOTDIR else f"unusable ({e.strerror})"
        return (f"/etc in the root is {what}: no /etc/passwd, /etc/group, /etc/resolv.conf or "
                "/etc/hosts were set up")


def write_identity(etc: int, name: str, content: str, root_entry: str) -> str | None:
    """Create etc/name, or add the root entry to the archive's own file if it has none."""
    try:
        return create_file(etc, name, content)
    except FileExistsError:
        return complete_identity(etc, name, root_entry)


def create_file(etc: int, name: str, content: str) -> str | None:
    """Create etc/name, mode 0644 whatever the umask; FileExistsError if anything is there."""
    try:
        fd = os.open(name, O_NEWFILE, 0o644, dir_fd=etc)
    except FileExistsError:
        raise
    except OSError as e:
        return f"cannot create /etc/{name} in the root: {e.strerror}"
    try:
        os.fchmod(fd, 0o644)
        os.write(fd, content.encode())
    finally:
        os.close(fd)
    return None


def complete_identity(etc: int, name: str, root_entry: str) -> str | None:
    """Keep the archive's own passwd or group; append the root entry when id 0 has none."""
    flags = os.O_RDWR | os.O_APPEND | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC
    try:
        # Before opening: an overlay copies the file up at open, which would hide its links.
        st = os.stat(name, dir_fd=etc, follow_symlinks=False)
        if stat.S_ISREG(st.st_mode) and st.st_nlink > 1:
            return f"/etc/{name} in the root is a hard link: it was left as it is"
        fd = os.open(name, flags, dir_fd=etc)
    except OSError as e:
        what = "a symlink" if e.errno == errno.ELOOP else f"unusable ({e.strerror})"
        return f"/etc/{name} in the root is {what}: it was left as it is"
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            return f"/etc/{name} in the root is not a regular file: it was left as it is"
        data = os.read(fd, READ_LIMIT)
        if any(line.split(b":")[2:3] == [b"0"] for line in data.splitlines()):
            return None
        log.debug("adding root to the archive's /etc/%s", name)
        os.write(fd, (b"\n" if data and not data.endswith(b"\n") else b"") + root_entry.encode())
        return None
    finally:
        os.close(fd)


def bind_host_file(etc: int, name: str) -> str | None:
    """Bind the host's /etc/name read-only over etc/name, creating or replacing the mount point.

    A host file that is a symlink (systemd-resolved's resolv.conf) is bound by its target.
    """
    try:
        source = os.open(f"/etc/{name}", os.O_PATH | os.O_CLOEXEC)
    except OSError as e:
        log.debug("the host has no usable /etc/%s: %s", name, e.strerror)
        if name == "hosts":
            with contextlib.suppress(FileExistsError):
                return create_file(etc, name, DEFAULT_HOSTS)
        return None
    try:
        if not stat.S_ISREG(os.fstat(source).st_mode):
            log.debug("the host's /etc/%s is not a regular file", name)
            return None
        warning = mount_point_file(etc, name)
        if warning:
            return warning
        target = os.open(name, O_PATHANY, dir_fd=etc)
        try:
            mount_on(target, f"/etc/{name}", fd_path(source), None, linux.MS_BIND)
        finally:
            os.close(target)
        # A fresh lookup gives the new mount rather than the file underneath it.
        mounted = os.open(name, O_PATHANY, dir_fd=etc)
        try:
            restrict_bind(mounted, Bind(f"/etc/{name}", f"etc/{name}", read_only=True))
        finally:
            os.close(mounted)
        return None
    finally:
        os.close(source)


def mount_point_file(etc: int, name: str) -> str | None:
    """Make etc/name a regular file to bind onto; an archive's symlink there is replaced."""
    try:
        st = os.stat(name, dir_fd=etc, follow_symlinks=False)
    except FileNotFoundError:
        st = None
    if st is not None and stat.S_ISLNK(st.st_mode):
        # Images often link resolv.conf to a resolver's file; the host's copy takes its place.
        log.debug("replacing the root's /etc/%s, a symlink, with the host's", name)
        os.unlink(name, dir_fd=etc)
        st = None
    if st is None:
        return create_file(etc, name, "")
    if not stat.S_ISREG(st.st_mode):
        return f"/etc/{name} in the root is not a regular file: the host's was not bound there"
    return None
