"""rpack run: unpack an archive (or reuse its cached root), run its program, remove the root."""

from __future__ import annotations

import contextlib
import logging
import os
import sys
from collections.abc import Iterator, Sequence
from typing import Any, BinaryIO

from unpacker import Limits, extract, open_archive
from unpacker.format import BASE_ENV
from unpacker.progress import reading

from .cache import DEFAULT_SIZE, Cache, quick_key
from .errors import RunError
from .init import GRACE
from .mounts import Bind, Layers
from .sandbox import check_namespaces, check_overlay, run
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
           grace: float = GRACE, host_files: bool = True, cache: bool = True,
           cache_size: int = DEFAULT_SIZE, quiet: bool = False) -> int:
    """Run the archive's entrypoint (or `entrypoint`) with `args`; return its exit status.

    The archive is checked as it is unpacked (`limits`, `trust_setuid`: see
    unpacker.extract); the program runs in the sandbox of runner.sandbox.run, seeing the
    root and the `binds` (and the host's resolv.conf and hosts, unless not `host_files`);
    the root is deleted afterwards unless `keep`. With `cache` (and not `keep`), an archive
    file is unpacked once into runner.cache (of at most `cache_size` bytes) and each run gets
    an overlay of its own on that root. A progress bar follows the unpacking unless `quiet`.
    """
    check_binds(binds)
    with open_archive(archive) as source, \
            reading(source, "unpacking", quiet) as (counted, progress):
        # Before unpacking anything: a host without user namespaces fails at once.
        check_namespaces()
        with workspace(tmpdir, keep) as place:
            try:
                with unpacked(counted, place, cache and not keep, cache_size,
                              limits or Limits(), trust_setuid) as (root, manifest, layers):
                    # Gone before the program writes anything.
                    progress.close()
                    argv = command(manifest, entrypoint, args)
                    stored_workdir = manifest.get("workdir")
                    cwd = workdir or (stored_workdir if isinstance(stored_workdir, str) else "/")
                    logger.debug("running %s in %s", argv, root)
                    return run(root, argv, environment(manifest, env or {}), cwd, binds=binds,
                               grace=grace, host_files=host_files, layers=layers)
            finally:
                if keep:
                    print(f"rpack: the root stays at {place}", file=sys.stderr)


@contextlib.contextmanager
def unpacked(source: BinaryIO, place: str, use_cache: bool, cache_size: int, limits: Limits,
             trust_setuid: bool) -> Iterator[tuple[str, dict[str, Any], Layers | None]]:
    """The root to run in, its manifest and its layers: from the cache, or unpacked in place.

    With the cache, place holds the run's upper and work layers and the empty root that the
    overlay is mounted on; without it, place is the root.
    """
    cache = open_cache(source, place, cache_size) if use_cache else None
    if cache is None:
        yield place, extract(source, place, limits=limits, trust_setuid=trust_setuid), None
        return
    try:
        entry = cache.acquire(source, limits, trust_setuid)
        try:
            upper, work, root = (os.path.join(place, name) for name in ("upper", "work", "root"))
            for path, mode in ((upper, 0o755), (work, 0o700), (root, 0o755)):
                os.mkdir(path)
                # The upper layer's mode is the root directory's, as the program sees it.
                os.chmod(path, mode)
            yield root, entry.manifest, Layers(entry.root, upper, work)
        finally:
            cache.release(entry)
    finally:
        cache.close()


def open_cache(source: BinaryIO, place: str, size: int) -> Cache | None:
    """The cache, if this archive and this host can use it; None, saying why, if not."""
    if quick_key(source) is None:
        logger.info("not using the cache: the archive is not a file read from its start")
        return None
    reason = check_overlay(place)
    if reason is not None:
        logger.info("not using the cache, since the sandbox cannot mount an overlay here: %s",
                    reason)
        return None
    try:
        return Cache.open(os.path.dirname(place), size)
    except RunError as e:
        logger.warning("%s; running without the cache", e)
        return None
