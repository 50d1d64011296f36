"""rpack run: unpack an archive into a private root, run its program there, remove the root."""

from __future__ import annotations

import contextlib
import logging
import os
import sys
from collections.abc import Iterator
from typing import Any, BinaryIO

from unpacker import extract

from .sandbox import RunError, run
from .workspace import workspace

logger = logging.getLogger(__name__)

DEFAULT_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"


@contextlib.contextmanager
def _source(archive: str) -> Iterator[BinaryIO]:
    if archive == "-":
        yield sys.stdin.buffer
        return
    try:
        f = open(archive, "rb")
    except OSError as e:
        raise RunError(f"cannot open {archive!r}: {e.strerror}") from None
    with f:
        yield f


def environment(manifest: dict[str, Any], extra: dict[str, str]) -> dict[str, str]:
    """The program's environment: a clean base, the archive's defaults, then the user's."""
    env = {"PATH": DEFAULT_PATH, "HOME": "/"}
    if "TERM" in os.environ:
        env["TERM"] = os.environ["TERM"]
    stored = manifest.get("env")
    if isinstance(stored, dict):
        env.update({str(k): str(v) for k, v in stored.items()})
    env.update(extra)
    return env


def command(manifest: dict[str, Any], entrypoint: str | None, args: list[str]) -> list[str]:
    if entrypoint:
        return [entrypoint, *args]
    stored = manifest.get("entrypoint")
    if not isinstance(stored, list) or not stored or not all(isinstance(a, str) for a in stored):
        raise RunError("the archive's manifest names no entrypoint",
                       hint="name the program to run with --entrypoint")
    return [*stored, *args]


def launch(archive: str, args: list[str], *, entrypoint: str | None = None,
           env: dict[str, str] | None = None, workdir: str | None = None,
           tmpdir: str | None = None, keep: bool = False) -> int:
    """Run the archive's entrypoint (or `entrypoint`) with `args`; return its exit status."""
    with _source(archive) as source, workspace(tmpdir, keep) as root:
        manifest = extract(source, root)
        argv = command(manifest, entrypoint, args)
        stored_workdir = manifest.get("workdir")
        cwd = workdir or (stored_workdir if isinstance(stored_workdir, str) else "/")
        logger.debug("running %s in %s", argv, root)
        status = run(root, argv, environment(manifest, env or {}), cwd)
        if keep:
            logger.warning("the root stays at %s (--keep)", root)
        return status
