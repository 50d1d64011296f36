"""rpack export-oci: images that skopeo, umoci and podman accept and that run as rpack run does."""

from __future__ import annotations

import gzip
import hashlib
import json
import os
import shutil
import stat
import subprocess
import tarfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import archives
import pytest
import zstandard
from conftest import RPACK, error_lines, needs_root, rpack, rpack_env

from packer.oci import default_reference, image_config, parse_reference

COMPRESSIONS = ("gzip", "zstd", "none")
SCRIPT = ('while read -r line; do echo "$line"; done < /etc/os-release; '
          'echo "$GREETING from $(pwd) as $0 with $# arguments: $*"; echo "$PATH $HOME"')
ARGS = ["-c", SCRIPT, "zero", "one", "two words"]
# What podman needs on this machine (ecosystem.md 1.4): no CAP_SYS_RESOURCE, hybrid cgroups.
RUN_FLAGS = ["--rm", "--pull=never", "--network", "none", "--ulimit", "nofile=1024:1024",
             "--ulimit", "nproc=1024:1024"]


def tag(compression: str) -> str:
    return f"rpack-test/sh:{compression}"


@pytest.fixture(scope="module")
def sh(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """/bin/sh with a working directory, an environment and a symlinked file of its own."""
    out = tmp_path_factory.mktemp("sh") / "sh.tar.zst"
    done = rpack("create", "--workdir", "/usr/bin", "--env", "GREETING=hello",
                 "--add", "/etc/os-release", out, "/bin/sh")
    assert done.returncode == 0, done.stderr
    return out


@pytest.fixture(scope="module")
def identity(sh: Path) -> str:
    done = rpack("inspect", "--json", sh)
    assert done.returncode == 0, done.stderr
    value: str = json.loads(done.stdout)["identity"]
    return value


@pytest.fixture(scope="module")
def images(sh: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    directory = tmp_path_factory.mktemp("images")
    made = {}
    for compression in COMPRESSIONS:
        out = directory / f"sh.{compression}.oci.tar"
        done = rpack("export-oci", "--compression", compression, "--tag", tag(compression),
                     sh, out)
        assert done.returncode == 0, done.stderr
        assert done.stderr == ""
        made[compression] = out
    return made


def tool(*argv: str | Path, timeout: float = 300) -> subprocess.CompletedProcess[str]:
    """Run a container tool; a missing one fails the test (CI installs them all)."""
    done = subprocess.run([str(arg) for arg in argv], capture_output=True, text=True,
                          timeout=timeout)
    assert done.returncode == 0, f"{argv}: {done.stderr}"
    return done


def skopeo_json(*argv: str) -> Any:
    return json.loads(tool("skopeo", *argv).stdout)


def members(image: Path) -> dict[str, bytes]:
    with tarfile.open(image) as tar:
        found = {}
        for member in tar:
            data = tar.extractfile(member) if member.isfile() else None
            found[member.name] = data.read() if data else b""
        return found


# --- the image itself ---------------------------------------------------------------------


@pytest.mark.parametrize("compression", COMPRESSIONS)
def test_image_is_an_oci_layout_and_a_docker_archive(images: dict[str, Path], identity: str,
                                                     compression: str) -> None:
    files = members(images[compression])
    names = list(files)
    assert names[:3] == ["oci-layout", "index.json", "manifest.json"]
    assert json.loads(files["oci-layout"]) == {"imageLayoutVersion": "1.0.0"}
    for name, data in files.items():
        if name.startswith("blobs/sha256/") and data:
            assert name == f"blobs/sha256/{hashlib.sha256(data).hexdigest()}"

    index = json.loads(files["index.json"])
    [descriptor] = index["manifests"]
    assert descriptor["annotations"] == {"org.opencontainers.image.ref.name": tag(compression)}
    manifest_blob = files["blobs/sha256/" + descriptor["digest"].removeprefix("sha256:")]
    assert len(manifest_blob) == descriptor["size"]
    manifest = json.loads(manifest_blob)
    [layer] = manifest["layers"]
    suffix = {"gzip": "+gzip", "zstd": "+zstd", "none": ""}[compression]
    assert layer["mediaType"] == "application/vnd.oci.image.layer.v1.tar" + suffix
    blob = files["blobs/sha256/" + layer["digest"].removeprefix("sha256:")]
    assert len(blob) == layer["size"]

    # The DiffID, checked here for every compression (umoci checks it, but reads no zstd).
    if compression == "gzip":
        assert blob[4:8] == bytes(4)  # no time stamp in the gzip header
        tar = gzip.decompress(blob)
    elif compression == "zstd":
        tar = zstandard.ZstdDecompressor().stream_reader(blob, read_across_frames=True).read()
    else:
        tar = blob
    config_digest = manifest["config"]["digest"].removeprefix("sha256:")
    config = json.loads(files[f"blobs/sha256/{config_digest}"])
    assert config["rootfs"] == {"type": "layers", "diff_ids": [identity]}
    assert f"sha256:{hashlib.sha256(tar).hexdigest()}" == identity

    docker = json.loads(files["manifest.json"])
    assert docker == [{"Config": f"blobs/sha256/{config_digest}", "RepoTags": [tag(compression)],
                       "Layers": ["blobs/sha256/" + layer["digest"].removeprefix("sha256:")]}]


@pytest.mark.parametrize("compression", COMPRESSIONS)
def test_skopeo_reads_both_faces(images: dict[str, Path], identity: str,
                                 compression: str) -> None:
    image = images[compression]
    for transport in ("oci-archive", "docker-archive"):
        # Naming the tag makes skopeo find it: ref.name in index.json, RepoTags in manifest.json.
        reference = f"{transport}:{image}:{tag(compression)}"
        shown = skopeo_json("inspect", reference)
        assert (shown["Architecture"], shown["Os"]) == ("amd64", "linux")
        config = skopeo_json("inspect", "--config", reference)
        assert config["architecture"] == "amd64"
        assert config["config"]["Entrypoint"] == ["/bin/sh"]
        assert config["config"]["WorkingDir"] == "/usr/bin"
        assert "GREETING=hello" in config["config"]["Env"]
        assert config["rootfs"]["diff_ids"] == [identity]


@pytest.mark.parametrize("compression", COMPRESSIONS)
def test_skopeo_copies_with_every_blob_digest_checked(images: dict[str, Path], tmp_path: Path,
                                                      compression: str) -> None:
    tool("skopeo", "copy", "--quiet", f"oci-archive:{images[compression]}",
         f"oci:{tmp_path / 'copy'}:sh")
    if compression != "zstd":  # skopeo writes no zstd layer into a docker archive
        tool("skopeo", "copy", "--quiet", f"oci-archive:{images[compression]}",
             f"docker-archive:{tmp_path / 'docker.tar'}:sh:copied")


def test_same_archive_gives_the_same_bytes(sh: Path, images: dict[str, Path],
                                           tmp_path: Path) -> None:
    for compression in COMPRESSIONS:
        again = tmp_path / f"again.{compression}"
        done = rpack("export-oci", "--compression", compression, "--tag", tag(compression),
                     sh, again)
        assert done.returncode == 0, done.stderr
        assert again.read_bytes() == images[compression].read_bytes()
    # Through pipes, with the default tag of standard input.
    with sh.open("rb") as stdin:
        piped = subprocess.run([*RPACK, "export-oci", "-", "-"], stdin=stdin,
                               capture_output=True, env=rpack_env())
    assert piped.returncode == 0, piped.stderr
    done = rpack("export-oci", "--tag", "rpack:latest", sh, tmp_path / "named")
    assert done.returncode == 0, done.stderr
    assert piped.stdout == (tmp_path / "named").read_bytes()


def test_default_tag_comes_from_the_file_name(sh: Path, tmp_path: Path) -> None:
    renamed = tmp_path / "My Tool_2.tar.zst"
    shutil.copy(sh, renamed)
    out = tmp_path / "image.tar"
    done = rpack("export-oci", renamed, out)
    assert done.returncode == 0, done.stderr
    assert json.loads(members(out)["manifest.json"])[0]["RepoTags"] == ["my-tool-2:latest"]
    assert default_reference("-") == "rpack:latest"
    assert default_reference("/x/.tar.zst") == "rpack:latest"


# --- umoci: the rootfs is the archive's ---------------------------------------------------


def tree(root: Path) -> dict[str, tuple[Any, ...]]:
    """Every entry below `root`: type, mode, owner, link target or content, hard-link peers,
    and for files the mtime (rpack extract sets no other's)."""
    entries: dict[str, tuple[Any, ...]] = {}
    peers: dict[tuple[int, int], list[str]] = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            path = Path(dirpath, name)
            st = os.lstat(path)
            rel = path.relative_to(root).as_posix()
            content: Any = None
            if stat.S_ISLNK(st.st_mode):
                content = os.readlink(path)
            elif stat.S_ISREG(st.st_mode):
                content = path.read_bytes()
                peers.setdefault((st.st_dev, st.st_ino), []).append(rel)
            mtime = st.st_mtime_ns if stat.S_ISREG(st.st_mode) else None
            entries[rel] = (stat.S_IFMT(st.st_mode), stat.S_IMODE(st.st_mode), st.st_uid,
                            st.st_gid, content, mtime)
    for group in peers.values():
        for rel in group:
            entries[rel] += (sorted(group),)
    return entries


def umoci_unpack(image: Path, reference: str, work: Path) -> Path:
    layout = work / "layout"
    layout.mkdir()
    tool("tar", "-xf", image, "-C", layout)
    # umoci checks each layer's DiffID against the config as it unpacks.
    tool("umoci", "unpack", "--image", f"{layout}:{reference}", work / "bundle")
    return work / "bundle" / "rootfs"


@needs_root
@pytest.mark.parametrize("compression", ["gzip", "none"])  # umoci 0.4.7 refuses tar+zstd
def test_umoci_rootfs_is_what_rpack_extract_makes(sh: Path, images: dict[str, Path],
                                                  tmp_path: Path, compression: str) -> None:
    rootfs = umoci_unpack(images[compression], tag(compression), tmp_path)
    extracted = tmp_path / "extracted"
    done = rpack("extract", "--trust-setuid", sh, extracted)
    assert done.returncode == 0, done.stderr

    # Below the roots: the roots themselves differ (umoci makes 0755, extract a new DIR 0700).
    ours, theirs = tree(extracted), tree(rootfs)
    assert sorted(ours) == sorted(theirs)
    manifest = json.loads((extracted / ".rpack/manifest.json").read_bytes())
    stored = {entry["path"]: entry["mode"] for entry in manifest["entries"]}
    for path, (kind, mode, *rest) in theirs.items():
        # umoci applies the stored mode as it is; rpack extract adds the owner's rw(x), as
        # documented (unpacker.extract): they differ only there, e.g. on proc (0555).
        if path in stored:
            assert mode == stored[path], path
        owner = 0o700 if stat.S_ISDIR(kind) else 0o600 if stat.S_ISREG(kind) else 0
        assert ours[path] == (kind, mode | owner, *rest), path
    assert stored["proc"] == 0o555  # so the comparison above did see a difference


# --- podman: the image runs as rpack run runs the archive ---------------------------------


class Podman:
    """podman with storage, run state and temporary files of its own, below a test's tmp dir."""

    def __init__(self, state: Path) -> None:
        self.state = state
        self.flags = ["--root", str(state / "root"), "--runroot", str(state / "run"),
                      "--tmpdir", str(state / "tmp"), "--storage-driver", "vfs",
                      "--cgroup-manager", "cgroupfs", "--runtime", "runc",
                      "--events-backend", "file"]

    def __call__(self, *argv: str | Path) -> subprocess.CompletedProcess[str]:
        return tool("podman", *self.flags, *argv)


@pytest.fixture(scope="module")
def podman(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Podman]:
    engine = Podman(tmp_path_factory.mktemp("podman"))
    try:
        yield engine
    finally:
        subprocess.run(["podman", *engine.flags, "rmi", "--all", "--force"],
                       capture_output=True, timeout=300)
        shutil.rmtree(engine.state, ignore_errors=True)


@pytest.fixture(scope="module")
def rpack_output(sh: Path) -> str:
    done = rpack("run", sh, *ARGS)
    assert done.returncode == 0, done.stderr
    assert "hello from /usr/bin as zero with 2 arguments: one two words" in done.stdout
    assert "PRETTY_NAME=" in done.stdout
    return done.stdout


@needs_root
@pytest.mark.parametrize("compression", COMPRESSIONS)
def test_podman_runs_the_image_as_rpack_runs_the_archive(
        podman: Podman, images: dict[str, Path], rpack_output: str, compression: str) -> None:
    loaded = podman("load", "--input", images[compression])
    assert f"localhost/{tag(compression)}" in loaded.stdout
    ran = podman("run", *RUN_FLAGS, tag(compression), *ARGS)
    assert ran.stdout == rpack_output
    podman("rmi", tag(compression))


@needs_root
def test_podman_runs_the_docker_archive_face(podman: Podman, images: dict[str, Path],
                                             rpack_output: str) -> None:
    pulled = podman("pull", "--quiet", f"docker-archive:{images['gzip']}")
    image_id = pulled.stdout.strip()
    ran = podman("run", *RUN_FLAGS, image_id, *ARGS)
    assert ran.stdout == rpack_output
    podman("rmi", image_id)


# --- refusals -----------------------------------------------------------------------------


def test_corrupt_archive_is_refused_as_verify_refuses_it(sh: Path, tmp_path: Path) -> None:
    data = bytearray(sh.read_bytes())
    data[len(data) // 2] ^= 0x10
    corrupt = tmp_path / "corrupt.tar.zst"
    corrupt.write_bytes(data)
    out = tmp_path / "out" / "image.tar"
    out.parent.mkdir()

    done = rpack("export-oci", corrupt, out)
    assert done.returncode == 1
    [line] = error_lines(done.stderr)
    assert done.stderr == line + "\n"
    assert list(out.parent.iterdir()) == []
    verified = rpack("verify", corrupt)
    assert verified.returncode == 1 and verified.stderr == done.stderr


def test_existing_output_needs_force(sh: Path, tmp_path: Path) -> None:
    out = tmp_path / "image.tar"
    out.write_text("precious")
    done = rpack("export-oci", sh, out)
    assert done.returncode == 1
    assert error_lines(done.stderr) == [f"rpack: error: {str(out)!r} already exists"]
    assert out.read_text() == "precious"
    assert rpack("export-oci", "-f", sh, out).returncode == 0
    assert members(out)["oci-layout"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["image.tar"]


def test_terminal_output_is_refused(sh: Path) -> None:
    controller, terminal = os.openpty()
    try:
        refused = subprocess.run([*RPACK, "export-oci", sh, "-"], stdout=terminal,
                                 stderr=subprocess.PIPE, env=rpack_env(), text=True)
    finally:
        os.close(controller)
        os.close(terminal)
    assert refused.returncode == 1
    assert error_lines(refused.stderr) == ["rpack: error: refusing to write an archive to a "
                                           "terminal"]


@pytest.mark.parametrize("bad", ["Upper:1", "app:", "app@sha256:" + "0" * 64, "a//b", "-x",
                                 "app:" + "t" * 129])
def test_bad_tag_is_a_usage_error(sh: Path, tmp_path: Path, bad: str) -> None:
    done = rpack("export-oci", f"--tag={bad}", sh, tmp_path / "image.tar")
    assert done.returncode == 2
    assert error_lines(done.stderr)[0].startswith("rpack: error: argument --tag: expected")
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize(("given", "reference"), [
    ("app", "app:latest"), ("app:1.0", "app:1.0"), ("team/app_x:v1-rc.2", "team/app_x:v1-rc.2"),
    ("localhost:5000/app", "localhost:5000/app:latest"),
    ("registry.example/team/app:1", "registry.example/team/app:1"),
])
def test_tags_engines_accept(given: str, reference: str) -> None:
    assert parse_reference(given) == reference


# --- the platform, for machines this host cannot run ------------------------------------


@pytest.mark.parametrize(("machine", "elf_class", "endian", "architecture", "variant"), [
    ("x86_64", 64, "little", "amd64", None), ("aarch64", 64, "little", "arm64", None),
    ("i686", 32, "little", "386", None), ("armv7l", 32, "little", "arm", "v7"),
    ("ppc64le", 64, "little", "ppc64le", None), ("s390x", 64, "big", "s390x", None),
    ("riscv64", 64, "little", "riscv64", None),
])
def test_architecture_in_the_engines_spelling(machine: str, elf_class: int, endian: str,
                                              architecture: str, variant: str | None) -> None:
    platform = {"machine": machine, "elf_class": elf_class, "endian": endian}
    config = image_config({"platform": platform, "entrypoint": ["/x"]}, "0" * 64, 0)
    assert (config["architecture"], config.get("variant"), config["os"]) == (
        architecture, variant, "linux")


def foreign_archive(path: Path, machine: str) -> Path:
    """A tiny archive whose manifest says it is for `machine`."""
    parts = [archives.directory("bin"), archives.file("bin/tool", b"#!/bin/true\n", 0o755)]
    manifest = archives.manifest(archives.entries(parts), entrypoint=["/bin/tool"],
                                 platform={**archives.HOST_PLATFORM, "machine": machine})
    path.write_bytes(archives.archive(*parts, head=archives.manifest_member(manifest)))
    return path


def test_archive_for_another_machine_exports(tmp_path: Path) -> None:
    out = tmp_path / "arm.oci.tar"
    done = rpack("export-oci", foreign_archive(tmp_path / "arm.tar.zst", "aarch64"), out)
    assert done.returncode == 0, done.stderr
    config = skopeo_json("inspect", "--config", f"oci-archive:{out}")
    assert config["architecture"] == "arm64"
    assert config["config"]["Entrypoint"] == ["/bin/tool"]


def test_machine_without_an_oci_name_is_refused(tmp_path: Path) -> None:
    out = tmp_path / "image.tar"
    done = rpack("export-oci", foreign_archive(tmp_path / "m.tar.zst", "m68k"), out)
    assert done.returncode == 1
    assert error_lines(done.stderr) == ["rpack: error: no OCI architecture for the archive's "
                                        "platform m68k (64-bit, little-endian)"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.tar.zst"]
