"""rpack run: unpack an archive into a private root, run its program there, remove the root."""

from __future__ import annotations

import logging
import os
import sys
from collections.abc import Sequence
from typing import Any

from unpacker import Limits, extract, open_archive
from unpacker.format import BASE_ENV

from .errors import RunError
from .init import GRACE
from .mounts import Bind
from .sandbox import check_namespaces, run
from .workspace import workspace

logger = logging.getLogger(__name__)

def environment(manifest: dict[str, Any], extra: dict[str, str]) -> dict[str, str]:
    """The program's environment: a clean base, the archive's defaults, then the user's."""
    env = dict(BASE_ENV)
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


def check_binds(binds: Sequence[Bind]) -> None:
    for bind in binds:
        try:
            os.stat(bind.source)
        except OSError as e:
            raise RunError(f"cannot bind {bind.source}: {e.strerror}") from None


def launch(archive: str, args: list[str], *, entrypoint: str | None = None,
           env: dict[str, str] | None = None, workdir: str | None = None,
           tmpdir: str | None = None, keep: bool = False, binds: Sequence[Bind] = (),
           limits: Limits | None = None, trust_setuid: bool = False,
           grace: float = GRACE, host_files: bool = True) -> int:
    """Run the archive's entrypoint (or `entrypoint`) with `args`; return its exit status.

    The archive is checked as it is unpacked (`limits`, `trust_setuid`: see
    unpacker.extract); the program runs in the sandbox of runner.sandbox.run, seeing the
    root and the `binds` (and the host's resolv.conf and hosts, unless not `host_files`);
    the root is deleted afterwards unless `keep`.
    """
    check_binds(binds)
    with open_archive(archive) as source:
        # Before unpacking anything: a host without user namespaces fails at once.
        check_namespaces()
        with workspace(tmpdir, keep) as root:
            try:
                manifest = extract(source, root, limits=limits, trust_setuid=trust_setuid)
                argv = command(manifest, entrypoint, args)
                stored_workdir = manifest.get("workdir")
                cwd = workdir or (stored_workdir if isinstance(stored_workdir, str) else "/")
                logger.debug("running %s in %s", argv, root)
                return run(root, argv, environment(manifest, env or {}), cwd, binds=binds,
                           grace=grace, host_files=host_files)
            finally:
                if keep:
                    print(f"rpack: the root stays at {root}", file=sys.stderr)
