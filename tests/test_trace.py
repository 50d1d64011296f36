"""rpack create and deps --trace: real programs run under the real strace, then packed and run."""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from conftest import (
    REPO,
    Toolchain,
    archive_members,
    archive_read,
    error_lines,
    rpack,
    run_cli,
    runpath,
)
from test_run import MODES, shared

from packer.trace import DEFAULT_EXCLUDES
from unpacker.format import MANIFEST_PATH

__all__ = ["shared"]  # a fixture, shared with test_run

PYTHON = "/usr/bin/python3"
IMPORTS = 'import ssl, sqlite3, json, ctypes, hashlib; print("ok")'

pytestmark = pytest.mark.skipif(shutil.which("strace") is None,
                                reason="strace is not installed (Debian: apt-get install strace)")


def _build_base() -> Path:
    """The checkout's build/, unless the checkout itself lies in a tree --trace leaves out
    by default (a clone under /tmp, as CI may make): then a directory under /var/lib."""
    real = os.path.realpath(REPO)
    if not any(real == tree or real.startswith(tree + "/") for tree, _ in DEFAULT_EXCLUDES):
        (REPO / "build").mkdir(exist_ok=True)
        return REPO / "build"
    return Path("/var/lib")


@pytest.fixture(scope="module")
def build() -> Iterator[Path]:
    """Where samples are built: not under /tmp, which --trace leaves out by default."""
    path = Path(tempfile.mkdtemp(prefix="rpack-trace-test-", dir=_build_base()))
    path.chmod(0o755)
    yield path
    shutil.rmtree(path)


def deps(*args: str | Path, cwd: Path | None = None) -> dict[str, Any]:
    done = rpack("deps", "--json", *args, cwd=cwd)
    assert done.returncode == 0, done.stderr
    report: dict[str, Any] = json.loads(done.stdout)
    return report


def traced(report: dict[str, Any]) -> dict[str, str]:
    """The traced files of a deps report: path -> why."""
    return {f["path"]: f["why"] for f in report["files"] if f["kind"] == "traced"}


def excluded(report: dict[str, Any]) -> dict[str, str]:
    return {e["path"]: e["why"] for e in report["trace"]["excluded"]}


def create(out: Path, *args: str | Path, cwd: Path | None = None) -> Path:
    done = rpack("create", out, *args, cwd=cwd)
    assert done.returncode == 0, done.stderr
    out.chmod(0o644)
    return out


# --- python3 with --trace ---------------------------------------------------------------------


@pytest.fixture(scope="module")
def python(shared: Path) -> Path:
    out = shared / "python.tar.zst"
    done = rpack("create", "--trace", out, PYTHON, "--", "-c", IMPORTS)
    assert done.returncode == 0, done.stderr
    # The traced run's output goes to rpack's standard error, never into the archive's way.
    assert done.stdout == "" and "ok\n" in done.stderr
    out.chmod(0o644)
    return out


def test_python_trace_packs_the_modules_it_imported(python: Path) -> None:
    members = archive_members(python)
    dynload = "usr/lib/python3.11/lib-dynload"
    for module in ("_ssl", "_sqlite3", "_ctypes", "_hashlib", "_json"):
        assert any(name.startswith(f"{dynload}/{module}.cpython") for name in members), module
    assert "usr/lib/python3.11/json/__init__.py" in members
    assert "usr/lib/python3.11/os.py" in members  # only looked up: python's landmark
    # The extension modules' libraries come with them.
    libraries = {name.rsplit("/", 1)[-1].split(".so")[0] for name in members if ".so" in name}
    assert {"libssl", "libcrypto", "libsqlite3", "libffi"} <= libraries
    # The trace found them itself (python's standard library may come by another rule too).
    used = {f["path"] for f in deps("--trace", PYTHON, "--", "-c", IMPORTS)["trace"]["files"]}
    assert {f"/{dynload}", "/usr/lib/python3.11/json/__init__.py",
            "/usr/lib/python3.11/os.py"} <= used
    assert any(path.startswith(f"/{dynload}/_ssl.cpython") for path in used)
    assert not any(path.startswith("/usr/lib/python3.11/email") for path in used)


@pytest.mark.root
@pytest.mark.parametrize("mode", MODES)
def test_python_trace_runs_in_the_root(python: Path, mode: str) -> None:
    done = run_cli(mode, "run", python, "-c", IMPORTS)
    assert (done.returncode, done.stdout, done.stderr) == (0, "ok\n", "")


def test_inspect_shows_what_was_traced(python: Path) -> None:
    summary = json.loads(rpack("inspect", "--json", python).stdout)
    trace = summary["trace"]
    assert trace["argv"] == [PYTHON, "-c", IMPORTS] and trace["status"] == 0
    files = {f["path"]: f["why"] for f in trace["files"]}
    assert files["/usr/lib/python3.11/json/__init__.py"] == "looked up by /usr/bin/python3 " \
        "during --trace"
    assert any(p.endswith(".pyc") and why.startswith("opened by") for p, why in files.items())
    text = rpack("inspect", python).stdout
    assert f"traced:      {len(files)} paths used by: {PYTHON} -c {IMPORTS}" in text.splitlines()


# --- a program that dlopens a plugin by name ----------------------------------------------------


@pytest.fixture(scope="module")
def plugin_program(build: Path, gcc: Toolchain) -> Path:
    plugins = build / "plugins"
    gcc.lib(plugins / "libplug.so", defines={"FN": "sample_plugin"})
    prog = gcc.exe(build / "bin" / "prog", flags=runpath(str(plugins)),
                   defines={"PLUGIN": '"libplug.so"'})
    return prog


def test_plugin_is_traced_with_its_reason(plugin_program: Path, build: Path) -> None:
    report = deps("--trace", plugin_program)
    assert traced(report)[str(build / "plugins" / "libplug.so")] == \
        f"opened by {plugin_program} during --trace"
    assert str(build / "plugins" / "libplug.so") not in {
        f["path"] for f in deps(plugin_program)["files"]}


@pytest.mark.root
@pytest.mark.parametrize("mode", MODES)
def test_plugin_program_packed_with_trace_runs(plugin_program: Path, shared: Path,
                                               mode: str) -> None:
    plain = create(shared / f"plugin-plain-{mode}.tar.zst", plugin_program)
    done = run_cli(mode, "run", plain)
    assert done.returncode == 0 and done.stdout.startswith("dlopen failed: libplug.so"), done
    with_trace = create(shared / f"plugin-{mode}.tar.zst", "--trace", plugin_program)
    done = run_cli(mode, "run", with_trace)
    assert (done.returncode, done.stdout, done.stderr) == (
        0, "plugin: sample_plugin\nsample ok\n", "")


# --- what is left out ---------------------------------------------------------------------------


HOST_FILES = " ".join(path for path in ("/etc/passwd", "/etc/group", "/etc/hosts", "/etc/hostname",
                                         "/etc/resolv.conf", "/proc/self/status")
                      if Path(path).exists())


def test_default_excludes(shared: Path, build: Path) -> None:
    script = (f"cat {HOST_FILES} /sys/kernel/uevent_seqnum /dev/null >/dev/null 2>&1; "
              "ls /tmp /dev >/dev/null; cat /etc/os-release >/dev/null; "
              f"echo out >{build}/output.txt")
    out = create(shared / "excludes.tar.zst", "--trace", "/bin/sh", "/bin/cat", "/bin/ls",
                 "--", "-c", script)
    report = deps("--trace", "/bin/sh", "/bin/cat", "/bin/ls", "--", "-c", script)
    used = traced(report)
    left_out = excluded(report)
    for path in HOST_FILES.split():
        assert path in left_out and path not in used, path
    assert "/etc/ld.so.cache" in left_out
    assert left_out[f"{build}/output.txt"] == "written by the traced run (an output)"
    assert left_out["/proc/self/status"].endswith("(/proc, a default --trace exclude)")
    assert "/etc/os-release" in used
    for path in used:
        assert not path.startswith(("/proc/", "/sys/", "/dev/", "/tmp", "/run/")), path
    members = archive_members(out)
    assert "usr/lib/os-release" in members and "etc/os-release" in members
    for name in members:
        top = name.split("/")[0]
        assert top not in ("proc", "sys", "dev", "tmp", "run") or name == top, name
        assert name not in ("etc/passwd", "etc/group", "etc/hosts", "etc/hostname",
                            "etc/resolv.conf", f"{build}/output.txt".lstrip("/")), name


def test_files_named_in_the_arguments_are_left_out(build: Path) -> None:
    (build / "input.txt").write_text("input\n")
    report = deps("--trace", "/bin/cat", "--", "input.txt", "/etc/debian_version", cwd=build)
    left_out = excluded(report)
    reason = "named in the traced run's arguments"
    assert left_out[str(build / "input.txt")] == reason
    assert left_out["/etc/debian_version"] == reason
    assert report["trace"]["argv"] == ["/bin/cat", "input.txt", "/etc/debian_version"]


def test_an_elf_file_left_out_is_warned_about_unless_it_is_packed(tmp_path: Path) -> None:
    # env runs the program its arguments name: left out as an input, so said.
    done = rpack("deps", "--trace", "/usr/bin/env", "--", "/usr/bin/true")
    assert done.returncode == 0, done.stderr
    assert done.stderr == ("rpack: warning: --trace: /usr/bin/true is left out: named in the "
                           "traced run's arguments; keep it with --trace-include\n")
    # A program under /tmp opens itself (a default exclude) but is packed as the program.
    program = shutil.copy("/bin/true", tmp_path / "prog")
    done = rpack("deps", "--trace", program)
    assert (done.returncode, done.stderr) == (0, ""), done.stderr


def test_trace_exclude_and_include(build: Path) -> None:
    # /etc/os-release is a symbolic link to ../usr/lib/os-release: a glob matching either
    # name leaves it out; an include brings back what the default list leaves out.
    script = "cat /etc/os-release /etc/hostname /usr/share/common-licenses/GPL-3 >/dev/null"
    report = deps("--trace", "--trace-exclude", "/usr/lib/os-rel*",
                  "--trace-exclude", "/usr/share/common-licenses",
                  "--trace-include", "/etc/hostname", "/bin/sh", "/bin/cat", "--", "-c", script)
    used, left_out = traced(report), excluded(report)
    assert left_out["/etc/os-release"] == "--trace-exclude"
    assert left_out["/usr/share/common-licenses/GPL-3"] == "--trace-exclude"
    assert used["/etc/hostname"] == "opened by /usr/bin/cat during --trace"


def test_relative_paths_and_children(build: Path) -> None:
    script_path = build / "hello.sh"
    script_path.write_text("#!/bin/bash\necho hello\n")
    script_path.chmod(0o755)
    report = deps("--trace", "/bin/sh", "--", "-c",
                  f"cd /usr/lib && cat os-release >/dev/null; {script_path}; true")
    used = traced(report)
    assert used["/usr/lib/os-release"] == "opened by /usr/bin/cat during --trace"
    assert used["/usr/bin/cat"] == "executed by /bin/sh during --trace"
    assert used[str(script_path)] == "executed by /bin/sh during --trace"
    assert used["/bin/bash"] == f"interpreter of {script_path}, executed during --trace"
    assert report["trace"]["status"] == 0


# --- errors -------------------------------------------------------------------------------------


def test_missing_strace_is_one_clear_error() -> None:
    done = rpack("deps", "--trace", "/bin/true", env={"PATH": "/nonexistent"})
    assert done.returncode == 1
    assert error_lines(done.stderr) == [
        "rpack: error: --trace needs strace, which is not installed (or not in PATH)"]
    assert "rpack: hint: install it, e.g. apt-get install strace" in done.stderr
    assert "Traceback" not in done.stderr


def test_arguments_after_double_dash_need_trace(tmp_path: Path) -> None:
    done = rpack("create", tmp_path / "a.tar.zst", "/bin/true", "--", "x")
    assert done.returncode == 2
    assert error_lines(done.stderr) == [
        "rpack: error: arguments after -- are for the traced run; create needs --trace"]
    assert not (tmp_path / "a.tar.zst").exists()


def test_failing_traced_run_is_a_warning(tmp_path: Path) -> None:
    done = rpack("create", "--trace", tmp_path / "f.tar.zst", "/bin/sh", "--", "-c", "exit 3")
    assert done.returncode == 0, done.stderr
    assert "rpack: warning: the traced run of /bin/sh exited with status 3" in done.stderr
    assert json.loads(rpack("inspect", "--json", tmp_path / "f.tar.zst").stdout)[
        "trace"]["status"] == 3


def test_manifest_origin_is_traced(python: Path) -> None:
    manifest = json.loads(archive_read(python, MANIFEST_PATH))
    origins = {e["path"]: e["origin"] for e in manifest["entries"]}
    assert origins["usr/lib/python3.11/json/__init__.py"] == "traced"
