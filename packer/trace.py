"""The --trace run: the entrypoint once on this host under strace, and the files it used."""

from __future__ import annotations

import fnmatch
import logging
import os
import re
import shutil
import subprocess
import tempfile
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field

from .errors import PackError

logger = logging.getLogger(__name__)

# What the run's environment starts from, as `rpack run` gives it (runner/launch.py).
RUN_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"

# Left out of what a run used unless --trace-include names them: kernel filesystems, scratch
# and run-time state, the host's identity and network files (the root gets its own, or the
# runner provides them), and the loader's cache, which create generates for the root.
DEFAULT_EXCLUDES: tuple[tuple[str, str], ...] = (
    ("/proc", "a kernel filesystem"),
    ("/sys", "a kernel filesystem"),
    ("/dev", "device nodes"),
    ("/run", "run-time state"),
    ("/var/run", "run-time state"),
    ("/tmp", "scratch space"),
    ("/var/tmp", "scratch space"),
    ("/etc/passwd", "host identity"),
    ("/etc/group", "host identity"),
    ("/etc/shadow", "host identity"),
    ("/etc/gshadow", "host identity"),
    ("/etc/subuid", "host identity"),
    ("/etc/subgid", "host identity"),
    ("/etc/hostname", "host identity"),
    ("/etc/machine-id", "host identity"),
    ("/var/lib/dbus/machine-id", "host identity"),
    ("/etc/hosts", "host network configuration"),
    ("/etc/resolv.conf", "host network configuration"),
    ("/etc/nsswitch.conf", "host network configuration"),
    ("/etc/host.conf", "host network configuration"),
    ("/etc/ld.so.cache", "generated for the root"),
    ("/etc/ld.so.preload", "the host loader's configuration"),
)

# The calls whose successful paths count; `?` lets strace skip what this machine lacks.
_OPEN = ("open", "openat", "openat2", "creat")
_EXEC = ("execve", "execveat")
_LOOKUP = ("stat", "lstat", "newfstatat", "statx", "access", "faccessat", "faccessat2",
           "readlink", "readlinkat")
_CWD = ("chdir", "fchdir")
_FORK = ("clone", "clone3", "fork", "vfork")
_WITH_DIRFD = {"openat", "openat2", "execveat", "newfstatat", "statx", "faccessat",
               "faccessat2", "readlinkat"}
_WRITE_FLAGS = re.compile(r"\bO_(WRONLY|CREAT|TRUNC)\b")
_PID = re.compile(r"(\d+) +(.*)")
_RESULT = re.compile(r"(.*)\) += (\d+)(?:<.*>)?(?: .*)?", re.DOTALL)
_STRING = r'"((?:[^"\\]|\\.)*)"'
_FD = r"(AT_FDCWD|-?\d+)(?:<((?:[^>\\]|\\.)*)>)?"
_ESCAPE = re.compile(rb"\\(x[0-9a-fA-F]{2}|[0-7]{1,3}|.)", re.DOTALL)
_SIMPLE = {b"n": b"\n", b"t": b"\t", b"r": b"\r", b"v": b"\v", b"f": b"\f"}


@dataclass(frozen=True)
class Traced:
    """A path the traced run used, why it counts, and whether it is a directory."""

    path: str
    why: str
    directory: bool = False


@dataclass
class TraceResult:
    """What `run_trace` found: the files to pack and the paths left out, with reasons."""

    argv: list[str]
    status: int
    files: list[Traced] = field(default_factory=list)
    excluded: list[tuple[str, str]] = field(default_factory=list)

    def report(self) -> dict[str, object]:
        """The `trace` object of `rpack deps --json`."""
        return {"argv": self.argv, "status": self.status,
                "files": [{"path": t.path, "why": t.why} for t in self.files],
                "excluded": [{"path": p, "why": why} for p, why in self.excluded]}

    def summary(self, packed: set[str]) -> dict[str, object]:
        """The manifest's `trace` object: the run, and the paths in `packed` it added."""
        return {"argv": [_shown(arg) for arg in self.argv], "status": self.status,
                "files": [{"path": _shown(t.path), "why": _shown(t.why)} for t in self.files
                          if t.path in packed],
                "excluded": len(self.excluded)}


@dataclass
class _Use:
    why: str
    rank: int               # 0 looked up, 1 opened, 2 executed: the strongest use says why
    written: bool = False


def run_trace(argv: list[str], env: dict[str, str], cwd: str, excludes: list[str],
              includes: list[str], programs: Iterable[str] = ()) -> TraceResult:
    """Run `argv` once under `strace -f` and return the files it opened, executed or looked up.

    The run gets the environment `rpack run` would give it (PATH, HOME=/, TERM, then `env`),
    the packing shell's working directory and standard input, and rpack's standard error for
    both its outputs (standard output may be the archive). Failed calls are ignored; files the
    run wrote are outputs and left out, as are the DEFAULT_EXCLUDES trees and files and the
    paths named in the run's arguments, unless an `includes` glob matches them; an `excludes`
    glob always wins. A glob matches a path or any directory above it. An ELF file left out
    by default or as an argument is warned about, unless it is one of `programs`, which are
    packed anyway.
    """
    strace = shutil.which("strace")
    if strace is None:
        raise PackError("--trace needs strace, which is not installed (or not in PATH)",
                        hint="install it, e.g. apt-get install strace")
    with tempfile.TemporaryDirectory(prefix="rpack-trace-") as scratch:
        log = os.path.join(scratch, "strace.log")
        status = _run(strace, log, argv, env, cwd)
        with open(log, "rb") as f:
            uses = _parse(f.read().decode("utf-8", "surrogateescape"), cwd, argv[0])
    if not uses:
        raise PackError(f"strace could not run {argv[0]!r} (see its message above)",
                        hint="strace needs ptrace, which some containers forbid")
    if status != 0:
        logger.warning("the traced run of %s exited with status %d; packing what it used",
                       argv[0], status)
    result = TraceResult(argv, status)
    packed = {os.path.realpath(program) for program in programs}
    _select(result, uses, _named(argv[1:], cwd), excludes, includes, packed)
    logger.info("--trace: %d paths used, %d left out (see rpack deps --json)",
                len(result.files), len(result.excluded))
    return result


def _run(strace: str, log: str, argv: list[str], env: dict[str, str], cwd: str) -> int:
    calls = ",".join(f"?{name}" for name in (*_OPEN, *_EXEC, *_LOOKUP, *_CWD, *_FORK))
    command = [strace, "-f", "-qq", "-y", "-o", log, "-e", f"trace={calls}",
               "-e", "signal=none", "--", *argv]
    environment = {"PATH": RUN_PATH, "HOME": "/"}
    if "TERM" in os.environ:
        environment["TERM"] = os.environ["TERM"]
    environment.update(env)
    logger.info("tracing: %s", " ".join(argv))
    try:
        # The run's output goes to standard error: standard output may carry the archive.
        return subprocess.run(command, env=environment, cwd=cwd, stdout=2).returncode
    except OSError as e:
        raise PackError(f"cannot run strace: {e.strerror}") from None


def _parse(text: str, cwd: str, program: str) -> dict[str, _Use]:
    """The paths of the successful calls in an `strace -f -y` log, in first-use order."""
    calls = list(_calls(text))
    # A child can report calls before its parent's fork returns: find parents first.
    parents = {code: pid for pid, name, _, code in calls if name in _FORK and code > 0}
    uses: dict[str, _Use] = {}
    cwds: dict[int, str] = {}
    exes: dict[int, str] = {}
    for pid, name, args, code in calls:
        if pid not in cwds and pid in parents:
            # XXX: the parent's state when the child first shows, not when it forked.
            cwds[pid] = cwds.get(parents[pid], cwd)
            if parents[pid] in exes:
                exes[pid] = exes[parents[pid]]
        _call(name, args, code, pid, uses, cwds, exes, cwd, program)
    return uses


def _calls(text: str) -> Iterator[tuple[int, str, str, int]]:
    """The successful calls of the log: pid, name, arguments and result."""
    pending: dict[int, str] = {}
    for line in text.splitlines():
        match = _PID.fullmatch(line)
        if match is None:
            continue
        pid, rest = int(match[1]), match[2]
        # Calls interrupted by another process's output are split across two lines.
        if rest.endswith(" <unfinished ...>"):
            pending[pid] = rest.removesuffix(" <unfinished ...>")
            continue
        if rest.startswith("<... "):
            rest = pending.pop(pid, "") + rest.partition(" resumed>")[2]
        name, paren, tail = rest.partition("(")
        # strace pads short calls to align the results: `chdir("/usr")       = 0`.
        call = _RESULT.fullmatch(tail)
        if paren and call is not None:
            yield pid, name, call[1], int(call[2])


def _call(name: str, args: str, code: int, pid: int, uses: dict[str, _Use],
          cwds: dict[int, str], exes: dict[int, str], cwd: str, program: str) -> None:
    here = cwds.get(pid, cwd)
    if name in _FORK:
        return
    match = re.match(_FD + ", " + _STRING if name in _WITH_DIRFD else _STRING, args)
    if name == "fchdir":
        fd = re.match(_FD, args)
        if fd and fd[2]:
            cwds[pid] = _decode(fd[2])
        return
    if match is None:
        return
    if name in _WITH_DIRFD:
        base = _decode(match[2]) if match[2] else here
        if match[1] == "AT_FDCWD" and match[2]:
            cwds[pid] = here = base
        path, rest = _decode(match[3]), args[match.end():]
    else:
        base, path, rest = here, _decode(match[1]), args[match.end():]
    if not path:
        return
    path = os.path.normpath(os.path.join(base, path))
    if name == "chdir":
        cwds[pid] = path
        return
    exe = exes.get(pid, program)
    if name in _EXEC:
        by = f"by {exe}" if pid in exes else "as the command"
        exes[pid] = path
        use = _Use(f"executed {by} during --trace", 2)
    elif name in _OPEN:
        use = _Use(f"opened by {exe} during --trace", 1)
    else:
        use = _Use(f"looked up by {exe} during --trace", 0)
    known = uses.setdefault(path, use)
    if use.rank > known.rank:
        known.why, known.rank = use.why, use.rank
    # A file opened to write is an output; one opened O_RDWR alone was read and updated.
    if name == "creat" or (name in _OPEN and _WRITE_FLAGS.search(rest)):
        known.written = True


def _decode(text: str) -> str:
    """A string as strace quotes it (C escapes, octal for other bytes) back to a path."""
    def one(match: re.Match[bytes]) -> bytes:
        escape = match[1]
        if escape[:1] == b"x":
            return bytes([int(escape[1:], 16)])
        if escape[:1].isdigit():
            return bytes([int(escape, 8) & 0xFF])
        return _SIMPLE.get(escape, escape)

    raw = _ESCAPE.sub(one, text.encode("utf-8", "surrogateescape"))
    return os.fsdecode(raw)


def _shown(text: str) -> str:
    # The manifest is UTF-8: bytes that are not are shown as escapes.
    return text.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")


def _named(args: list[str], cwd: str) -> set[str]:
    """The existing paths the run's arguments name, also as the value of `--opt=PATH`."""
    named = set()
    for arg in args:
        for candidate in (arg, arg.partition("=")[2]):
            if candidate:
                path = os.path.normpath(os.path.join(cwd, candidate))
                if os.path.lexists(path):
                    named.add(path)
    return named


def _select(result: TraceResult, uses: dict[str, _Use], named: set[str], excludes: list[str],
            includes: list[str], packed: set[str]) -> None:
    """Sort what the run used into files to pack and paths left out, adding script
    interpreters, which the kernel opens without a system call."""
    for path, use in _with_interpreters(uses).items():
        real = os.path.realpath(path)
        reason = None
        if _matches(path, excludes) or _matches(real, excludes):
            reason = "--trace-exclude"
        elif _matches(path, includes) or _matches(real, includes):
            reason = None
        elif use.written:
            reason = "written by the traced run (an output)"
        elif path in named:
            reason = "named in the traced run's arguments"
        else:
            reason = _default_reason(path) or _default_reason(real)
        if reason not in (None, "--trace-exclude") and not use.written and real not in packed \
                and _is_elf(path):
            logger.warning("--trace: %s is left out: %s; keep it with --trace-include",
                           path, reason)
        if reason is not None:
            logger.debug("--trace: %s left out: %s", path, reason)
            result.excluded.append((path, reason))
        elif os.path.isdir(path):
            result.files.append(Traced(path, use.why, directory=True))
        elif os.path.isfile(path) and not os.access(path, os.R_OK):
            logger.warning("--trace: %s is not readable here, left out", path)
            result.excluded.append((path, "not readable by rpack"))
        elif os.path.isfile(path):
            result.files.append(Traced(path, use.why))
        else:
            logger.debug("--trace: %s is gone or not a regular file, left out", path)


def _with_interpreters(uses: dict[str, _Use]) -> dict[str, _Use]:
    every = dict(uses)
    todo = [path for path, use in uses.items() if use.rank == 2]
    while todo:
        script = todo.pop()
        interpreter = _shebang(script)
        if interpreter is not None and interpreter not in every:
            every[interpreter] = _Use(f"interpreter of {script}, executed during --trace", 2)
            todo.append(interpreter)
    return every


def _shebang(path: str) -> str | None:
    try:
        with open(path, "rb") as f:
            first = f.readline(256)
    except OSError:
        return None
    words = first[2:].split() if first.startswith(b"#!") else []
    return os.fsdecode(words[0]) if words and words[0].startswith(b"/") else None


def _is_elf(path: str) -> bool:
    # Kernel files can block or have side effects when read; fifos block on open.
    if path.startswith(("/proc/", "/sys/", "/dev/")) or not os.path.isfile(path):
        return False
    try:
        with open(path, "rb") as f:
            return f.read(4) == b"\x7fELF"
    except OSError:
        return False


def _default_reason(path: str) -> str | None:
    for top, reason in DEFAULT_EXCLUDES:
        if path == top or path.startswith(top + "/"):
            return f"{reason} ({top}, a default --trace exclude)"
    return None


def _matches(path: str, globs: list[str]) -> bool:
    """Whether a glob matches `path` or a directory above it."""
    while globs:
        if any(fnmatch.fnmatchcase(path, glob) for glob in globs):
            return True
        if path == "/":
            return False
        path = os.path.dirname(path)
    return False
