"""Checking an archive without writing anything: verify, and inspect's summary of it."""

import logging
from dataclasses import dataclass
from typing import Any, BinaryIO

from unpacker.limits import Limits
from unpacker.stream import ArchiveReader

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class Summary:
    """What a full pass over an archive found: its manifest, identity and sizes.

    `identity` is the sha256 of the uncompressed tar stream (the OCI DiffID), the same as
    `zstd -dc ARCHIVE | sha256sum`. `members` counts tar members, the manifest included.
    """

    manifest: dict[str, Any]
    identity: str
    members: int
    file_bytes: int
    tar_bytes: int
    compressed_bytes: int

    def as_json(self) -> dict[str, Any]:
        """The summary as `rpack inspect --json` prints it."""
        keys = ("format", "generator", "platform", "entrypoint", "programs", "env", "workdir",
                "totals")
        summary = {key: self.manifest.get(key) for key in keys}
        summary.update({
            "identity": f"sha256:{self.identity}",
            "members": self.members,
            "entries": len(self.manifest["entries"]),
            "file_bytes": self.file_bytes,
            "tar_bytes": self.tar_bytes,
            "compressed_bytes": self.compressed_bytes,
        })
        if isinstance(self.manifest.get("trace"), dict):
            summary["trace"] = self.manifest["trace"]
        return summary

    def lines(self) -> list[str]:
        """The summary as `rpack inspect` prints it, one `label: value` per line."""
        m = self.manifest
        platform = m["platform"]
        libc = " ".join(str(platform.get(key) or "") for key in ("libc", "libc_version")).strip()
        rows = [
            ("format", f"{m['format']} ({m.get('generator', 'unknown generator')})"),
            ("identity", f"sha256:{self.identity}"),
            ("platform", f"{platform['machine']}, {platform['elf_class']}-bit, "
                         f"{platform['endian']}-endian, {libc or 'unknown libc'}"),
            ("min kernel", platform.get("min_kernel") or "not stated"),
            ("entrypoint", _words(m.get("entrypoint"))),
            ("programs", _words(m.get("programs"))),
            ("workdir", str(m.get("workdir", "/"))),
            ("env", _words([f"{k}={v}" for k, v in _mapping(m.get("env")).items()])),
            ("members", f"{self.members} (the manifest and {len(m['entries'])} entries)"),
            ("files", _size(self.file_bytes)),
            ("tar", _size(self.tar_bytes)),
            ("compressed", _size(self.compressed_bytes)),
        ]
        trace = m.get("trace")
        if isinstance(trace, dict):
            files = trace.get("files")
            rows.append(("traced", f"{len(files) if isinstance(files, list) else 0} paths "
                                   f"used by: {_words(trace.get('argv'))}"))
        return [f"{label + ':':<12} {value}" for label, value in rows]


def verify(source: BinaryIO, *, limits: Limits | None = None,
           check_platform: bool = True) -> Summary:
    """Run every check `extract` runs over the archive read from `source`, writing nothing.

    Raises UnpackError at the first fault: the same one extract would raise, except for what
    only the destination can tell (free space, a name collision on a case-insensitive
    filesystem). With `check_platform` False, an archive for another platform passes too.
    """
    reader = ArchiveReader(source, limits, check_platform=check_platform)
    for item in reader:
        for _ in item.data:
            pass
    assert reader.manifest is not None and reader.identity is not None
    logger.info("verified %d members, identity sha256:%s", reader.members, reader.identity)
    return Summary(reader.manifest.data, reader.identity, reader.members,
                   reader.manifest.file_bytes, reader.tar_bytes, reader.compressed_bytes)


def inspect(source: BinaryIO, *, limits: Limits | None = None) -> Summary:
    """Summarise the archive read from `source`, after the checks of `verify`.

    The platform is shown, not checked: an archive for another machine can be inspected.
    """
    return verify(source, limits=limits, check_platform=False)


def _words(value: Any) -> str:
    if isinstance(value, list) and value:
        return " ".join(str(word) for word in value)
    return "none"


def _mapping(value: Any) -> dict[str, Any]:
    return value if isinstance(value, dict) else {}


def _size(size: int) -> str:
    value = float(size)
    for unit in ("KiB", "MiB", "GiB", "TiB"):
        value /= 1024
        if value < 1024 or unit == "TiB":
            return f"{size} bytes ({value:.1f} {unit})"
    return f"{size} bytes"
