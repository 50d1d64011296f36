"""Shebang scripts: the interpreters the kernel runs for a program that starts with `#!`."""

from __future__ import annotations

import logging
import os
import stat
from dataclasses import dataclass

from .errors import PackError

logger = logging.getLogger(__name__)

BINPRM_BUF_SIZE = 256   # the kernel reads this much of the first line (255 bytes and a NUL)
MAX_DEPTH = 4           # interpreters that are scripts themselves, at most (R80)
# env options that take the next word as their value (coreutils env).
_ENV_VALUE_OPTIONS = {"-u", "--unset", "-C", "--chdir", "-a", "--argv0"}


@dataclass(frozen=True)
class Shebang:
    """The first line of a script as the kernel splits it (R80)."""

    interp: str             # the interpreter path, up to the first space or tab
    arg: str | None         # all the remaining text: one argument, whitespace trimmed


@dataclass(frozen=True)
class Hop:
    """One program a script's execution runs, with the reason it is needed."""

    path: str
    why: str


def read_shebang(path: str) -> Shebang | None:
    """The `#!` line of `path`, or None when the file does not start with `#!`."""
    try:
        with open(path, "rb") as f:
            head = f.read(BINPRM_BUF_SIZE)
    except OSError as e:
        raise PackError(f"cannot read {path!r}: {e.strerror}") from None
    if not head.startswith(b"#!"):
        return None
    line = head[2:].split(b"\n", 1)[0].decode("utf-8", "surrogateescape")
    # The kernel skips spaces and tabs, cuts the path at the next one and keeps the rest whole.
    line = line.lstrip(" \t")
    for index, char in enumerate(line):
        if char in " \t":
            arg = line[index:].strip(" \t")
            return Shebang(line[:index], arg or None)
    return Shebang(line, None)


def is_script(path: str) -> bool:
    return read_shebang(path) is not None


def env_name(arg: str | None) -> str | None:
    """The program name `/usr/bin/env` runs for this shebang argument (R81).

    Without -S the whole argument is one name, so `#!/usr/bin/env python3 -I` looks up a
    program called "python3 -I", as env does; with -S it is split on whitespace.
    """
    if arg is None:
        return None
    words = arg.split() if arg.startswith("-S") or arg.startswith("--split-string") else [arg]
    if words and words[0].startswith("-S") and len(words[0]) > 2:
        words[0] = words[0][2:]     # -Spython3: the option's value is glued to it
    elif words and words[0] in ("-S", "--split-string"):
        words = words[1:]
    skip = False
    for word in words:
        if skip:
            skip = False
        elif word in _ENV_VALUE_OPTIONS:
            skip = True
        elif word.startswith("-") or "=" in word:
            continue
        else:
            return word
    return None


def which(name: str, path: str) -> str | None:
    """The first executable regular file `name` in the PATH `path`, as env's execvp finds it."""
    for directory in path.split(":"):
        candidate = os.path.join(directory or ".", name)
        if not candidate.startswith("/"):
            continue    # XXX: an empty or relative PATH entry depends on the run-time CWD.
        try:
            st = os.stat(candidate)
        except OSError:
            continue
        if stat.S_ISREG(st.st_mode) and os.access(candidate, os.X_OK):
            return candidate
    return None


def interpreters(script: str, path: str) -> list[Hop]:
    """Every program the kernel and env run for `script`, first to last; the last is an ELF.

    `path` is the PATH the root will have, for `#!/usr/bin/env NAME`.
    """
    hops: list[Hop] = []
    current = script
    for _ in range(MAX_DEPTH + 1):
        shebang = read_shebang(current)
        if shebang is None:
            return hops
        if len(hops) >= MAX_DEPTH:
            break
        interp = _checked_interp(current, shebang)
        hops.append(Hop(interp, f"#! interpreter of {current}"))
        if os.path.basename(interp) == "env" and shebang.arg is not None:
            interp = _env_target(current, shebang.arg, path)
            hops.append(Hop(interp, f"run by {shebang.interp} for {current}, found in PATH"))
        current = interp
    raise PackError(f"{script!r}: more than {MAX_DEPTH} levels of #! interpreters",
                    hint="the kernel refuses deeper chains (ELOOP)")


def _checked_interp(script: str, shebang: Shebang) -> str:
    interp = shebang.interp
    if not interp:
        raise PackError(f"{script!r}: the #! line names no interpreter")
    if not interp.startswith("/"):
        raise PackError(f"{script!r}: #! interpreter {interp!r} is a relative path",
                        hint="the kernel resolves it against the CWD at run time; use an "
                             "absolute path")
    if not os.path.isfile(interp):
        hint = "the script has DOS line endings (CRLF)" if interp.endswith("\r") else \
            "install it, or fix the #! line"
        raise PackError(f"{script!r}: #! interpreter {interp!r} does not exist", hint=hint)
    return interp


def _env_target(script: str, arg: str, path: str) -> str:
    name = env_name(arg)
    if name is None:
        raise PackError(f"{script!r}: #!/usr/bin/env {arg} names no program")
    if "/" in name:
        if not os.path.isfile(name):
            raise PackError(f"{script!r}: {name!r} (run by env) does not exist")
        return name
    found = which(name, path)
    if found is None:
        hint = "env without -S takes the whole rest of the line as one name" if " " in name \
            else f"install it, or pass --env PATH=... so that it is found in {path}"
        raise PackError(f"{script!r}: env finds no {name!r} in PATH {path}", hint=hint)
    logger.debug("%s: env runs %s", script, found)
    return found
