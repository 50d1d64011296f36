"""rpack export-oci: an archive as a one-layer container image, an OCI layout docker loads too."""

from __future__ import annotations

import contextlib
import datetime
import gzip
import hashlib
import io
import json
import logging
import os
import re
import tarfile
import tempfile
from dataclasses import dataclass
from typing import Any, BinaryIO, Protocol, cast

from unpacker.format import BASE_ENV
from unpacker.limits import Limits
from unpacker.progress import bar, reading
from unpacker.stream import ArchiveReader

from .archive import CHUNK, TarWriter, compressor, tarinfo
from .errors import PackError

logger = logging.getLogger(__name__)

LAYER_TYPES = {
    "gzip": "application/vnd.oci.image.layer.v1.tar+gzip",
    "zstd": "application/vnd.oci.image.layer.v1.tar+zstd",
    "none": "application/vnd.oci.image.layer.v1.tar",
}
CONFIG_TYPE = "application/vnd.oci.image.config.v1+json"
MANIFEST_TYPE = "application/vnd.oci.image.manifest.v1+json"
INDEX_TYPE = "application/vnd.oci.image.index.v1+json"
REF_NAME = "org.opencontainers.image.ref.name"
GZIP_LEVEL = 6  # what docker and podman use
ZSTD_LEVEL = 3
DEFAULT_NAME = "rpack"
DEFAULT_TAG = "latest"

# The manifest's platform (machine as `uname -m` spells it, ELF class, byte order) in the
# GOARCH spelling that image configs use, with the variant where one is customary.
ARCHITECTURES: dict[tuple[str, int, str], tuple[str, str | None]] = {
    ("x86_64", 64, "little"): ("amd64", None),
    ("i686", 32, "little"): ("386", None),
    ("aarch64", 64, "little"): ("arm64", None),
    ("armv7l", 32, "little"): ("arm", "v7"),
    ("ppc64le", 64, "little"): ("ppc64le", None),
    ("ppc64", 64, "big"): ("ppc64", None),
    ("s390x", 64, "big"): ("s390x", None),
    ("riscv64", 64, "little"): ("riscv64", None),
}

# The reference grammar of docker and podman (distribution/reference): lowercase path
# components, an optional registry host first, a tag of at most 128 characters.
_COMPONENT = re.compile(r"[a-z0-9]+(?:(?:[._]|__|-+)[a-z0-9]+)*")
_HOST = re.compile(r"[a-zA-Z0-9](?:[a-zA-Z0-9-]*[a-zA-Z0-9])?"
                   r"(?:\.[a-zA-Z0-9](?:[a-zA-Z0-9-]*[a-zA-Z0-9])?)*(?::[0-9]+)?")
_TAG = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.-]{0,127}")
NAME_MAX = 255


def parse_reference(text: str) -> str:
    """`NAME[:TAG]` as engines accept it, with `:latest` added when no tag is given.

    Raises ValueError for anything else, a digest reference (`@sha256:...`) included.
    """
    name, tag = text, DEFAULT_TAG
    if ":" in text.rsplit("/", 1)[-1]:
        name, tag = text.rsplit(":", 1)
    parts = name.split("/")
    host = len(parts) > 1 and ("." in parts[0] or ":" in parts[0] or parts[0] == "localhost")
    valid = (
        len(name) <= NAME_MAX
        and _TAG.fullmatch(tag) is not None
        and (not host or _HOST.fullmatch(parts[0]) is not None)
        and all(_COMPONENT.fullmatch(part) for part in parts[1 if host else 0:])
    )
    if not valid:
        raise ValueError(f"expected NAME[:TAG] with a lowercase NAME, such as 'app:1.0' or "
                         f"'registry.example:5000/team/app', got {text!r}")
    return f"{name}:{tag}"


def default_reference(archive: str) -> str:
    """The image name for an archive file: its name without `.tar.zst`, tagged `latest`.

    Characters a name may not hold become `-`, so `My App.tar.zst` gives `my-app:latest`;
    standard input, or a file name with nothing usable, gives `rpack:latest`.
    """
    base = "" if archive == "-" else os.path.basename(archive)
    for suffix in (".tar.zst", ".tzst", ".zst", ".tar"):
        if base.endswith(suffix):
            base = base.removesuffix(suffix)
            break
    name = re.sub("[^a-z0-9]+", "-", base.lower()).strip("-")[:128]
    return f"{name or DEFAULT_NAME}:{DEFAULT_TAG}"


@dataclass(frozen=True)
class Layer:
    """The compressed layer as written to its temporary file, and what describes it."""

    diff_id: str  # sha256 of the uncompressed tar: the archive's identity
    digest: str  # sha256 of the blob as stored
    size: int
    media_type: str
    manifest: dict[str, Any]  # the rpack manifest
    mtime: int  # the manifest member's: when the archive was packed


@dataclass(frozen=True)
class Exported:
    """What an export wrote: the image's name, its layer's DiffID, its manifest's digest."""

    reference: str
    diff_id: str
    manifest_digest: str
    layer_size: int


def export_oci(source: BinaryIO, out: BinaryIO, reference: str, *, compression: str = "gzip",
               limits: Limits | None = None, layer_dir: str | None = None,
               quiet: bool = False) -> Exported:
    """Write the archive read from `source` to `out` as a container image named `reference`.

    The archive is read once, front to back, with every check of `rpack verify` except the
    platform (an image for another machine is fine); a refused archive raises UnpackError.
    Its uncompressed tar, unchanged, is the image's one layer, so the layer's DiffID is the
    archive's identity. The layer is compressed (`compression`: gzip, zstd or none) into an
    unnamed temporary file in `layer_dir` (default: $TMPDIR) as it streams past, since the
    image tar needs its size and digest before its bytes; then `out` gets one tar that is an
    OCI image layout (`oci-archive:`) and, through a docker `manifest.json` beside it, a
    docker archive (`docker load`). Same archive, same arguments: same bytes.
    """
    with tempfile.TemporaryFile(dir=layer_dir, prefix=".rpack-layer-") as layer_file:
        layer = _write_layer(source, layer_file, compression, limits, quiet)
        config, manifest, index, docker = _documents(layer, reference)
        layer_file.seek(0)
        with bar("writing image", layer.size, quiet) as progress:
            # The small files first, then the blobs, the layer last: every member's bytes and
            # metadata follow from the archive and the arguments alone.
            tar = TarWriter(out, progress.update)
            for name, data in (("oci-layout", _json({"imageLayoutVersion": "1.0.0"})),
                               ("index.json", index), ("manifest.json", docker)):
                _add_bytes(tar, name, data, layer.mtime)
            for directory in ("blobs", "blobs/sha256"):
                tar.add(tarinfo(directory, tarfile.DIRTYPE, 0o755, layer.mtime))
            for data in (config, manifest):
                _add_bytes(tar, _blob_path(_sha256(data)), data, layer.mtime)
            tar.add(tarinfo(_blob_path(layer.digest), tarfile.REGTYPE, 0o644, layer.mtime,
                            layer.size),
                    layer_file)
            tar.close()

    manifest_digest = _sha256(manifest)
    logger.info("exported sha256:%s as %s (%s layer of %d bytes), manifest sha256:%s",
                layer.diff_id, reference, compression, layer.size, manifest_digest)
    return Exported(reference, layer.diff_id, manifest_digest, layer.size)


def _documents(layer: Layer, reference: str) -> tuple[bytes, bytes, bytes, bytes]:
    """The image config, the OCI manifest, the OCI index and the docker manifest.json."""
    config_object = image_config(layer.manifest, layer.diff_id, layer.mtime)
    config = _json(config_object)
    manifest = _json({
        "schemaVersion": 2,
        "mediaType": MANIFEST_TYPE,
        "config": _descriptor(CONFIG_TYPE, config),
        "layers": [{"mediaType": layer.media_type, "digest": f"sha256:{layer.digest}",
                    "size": layer.size}],
    })
    platform = {key: config_object[key] for key in ("architecture", "os", "variant")
                if key in config_object}
    # podman names a loaded image after ref.name, so it carries the whole NAME:TAG.
    index = _json({
        "schemaVersion": 2,
        "mediaType": INDEX_TYPE,
        "manifests": [{**_descriptor(MANIFEST_TYPE, manifest), "platform": platform,
                       "annotations": {REF_NAME: reference}}],
    })
    # What docker load reads (as docker 25 saves it): paths into the same blobs.
    docker = _json([{"Config": _blob_path(_sha256(config)), "RepoTags": [reference],
                     "Layers": [_blob_path(layer.digest)]}])
    return config, manifest, index, docker


def image_config(manifest: dict[str, Any], diff_id: str, mtime: int) -> dict[str, Any]:
    """The image config for an rpack manifest: what `rpack run` would start, on its platform.

    The environment is the one `rpack run` gives (its base, then the archive's `env`); the
    creation time is `mtime`, the archive's own, so the config is the same on every export.
    """
    architecture, variant = oci_architecture(manifest["platform"])
    env = dict(BASE_ENV)
    stored_env = manifest.get("env")
    if isinstance(stored_env, dict):
        env.update({str(name): str(value) for name, value in stored_env.items()})
    workdir = manifest.get("workdir")
    run: dict[str, Any] = {"Env": [f"{name}={value}" for name, value in env.items()],
                           "WorkingDir": workdir if isinstance(workdir, str) else "/"}
    entrypoint = manifest.get("entrypoint")
    if isinstance(entrypoint, list) and entrypoint and all(isinstance(a, str) for a in entrypoint):
        run["Entrypoint"] = entrypoint
    else:
        logger.warning("the archive's manifest names no entrypoint: the image has none either, "
                       "and runs only with a command given")

    created = datetime.datetime.fromtimestamp(mtime, datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
    config: dict[str, Any] = {
        "created": created,
        "architecture": architecture,
        "os": "linux",
        "config": run,
        "rootfs": {"type": "layers", "diff_ids": [f"sha256:{diff_id}"]},
        "history": [{"created": created, "created_by": str(manifest.get("generator", "rpack"))}],
    }
    if variant:
        config["variant"] = variant
    return config


def oci_architecture(platform: dict[str, Any]) -> tuple[str, str | None]:
    """The architecture and variant of the manifest's platform, as image configs name them."""
    key = (platform["machine"], platform["elf_class"], platform["endian"])
    if key not in ARCHITECTURES:
        raise PackError(f"no OCI architecture for the archive's platform {key[0]} "
                        f"({key[1]}-bit, {key[2]}-endian)")
    return ARCHITECTURES[key]


class _Writable(Protocol):
    def write(self, data: bytes, /) -> object: ...
    def close(self) -> None: ...


class _Digesting:
    """The layer's temporary file, counting and hashing what is written to it: the blob."""

    def __init__(self, file: BinaryIO) -> None:
        self._file = file
        self.digest = hashlib.sha256()
        self.size = 0

    def write(self, data: bytes) -> int:
        self.digest.update(data)
        self.size += len(data)
        self._file.write(data)
        return len(data)

    def flush(self) -> None:
        self._file.flush()

    def close(self) -> None:
        pass  # the file is the caller's


def _write_layer(source: BinaryIO, layer_file: BinaryIO, compression: str,
                 limits: Limits | None, quiet: bool) -> Layer:
    blob = _Digesting(layer_file)
    blob_file = cast(BinaryIO, blob)  # file enough for the compressors: write and flush
    sink: _Writable
    if compression == "gzip":
        # No file name and mtime 0 in the gzip header: the blob depends on the tar alone.
        sink = gzip.GzipFile(filename="", mode="wb", compresslevel=GZIP_LEVEL,
                             fileobj=blob_file, mtime=0)
    elif compression == "zstd":
        sink = compressor(ZSTD_LEVEL).stream_writer(blob_file, closefd=False, write_size=CHUNK)
    elif compression == "none":
        sink = blob
    else:
        raise ValueError(f"unknown compression {compression!r}")

    try:
        with reading(source, "reading archive", quiet) as (counted, _):
            reader = ArchiveReader(counted, limits, check_platform=False, tar_sink=sink.write)
            mtime = 0
            for item in reader:
                if item.entry is None:
                    # The manifest: refuse a platform without an OCI name before reading on.
                    assert reader.manifest is not None
                    oci_architecture(reader.manifest.data["platform"])
                    mtime = item.member.mtime
                for _ in item.data:
                    pass
    except BaseException:
        # The layer is thrown away with its file; its compressor only has to let go.
        with contextlib.suppress(Exception):
            sink.close()
        raise
    sink.close()
    assert reader.manifest is not None and reader.identity is not None
    return Layer(reader.identity, blob.digest.hexdigest(), blob.size, LAYER_TYPES[compression],
                 reader.manifest.data, mtime)


def _add_bytes(tar: TarWriter, name: str, data: bytes, mtime: int) -> None:
    tar.add(tarinfo(name, tarfile.REGTYPE, 0o644, mtime, len(data)), io.BytesIO(data))


def _json(obj: Any) -> bytes:
    """Canonical JSON: sorted keys, no spaces, so the same object always has the same digest."""
    return json.dumps(obj, sort_keys=True, separators=(",", ":")).encode()


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _descriptor(media_type: str, data: bytes) -> dict[str, Any]:
    return {"mediaType": media_type, "digest": f"sha256:{_sha256(data)}", "size": len(data)}


def _blob_path(digest: str) -> str:
    return f"blobs/sha256/{digest}"
