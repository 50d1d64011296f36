"""Run-time loads packed by default: libgcc_s, NSS, gconv, locale, terminfo, .note.dlopen."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import archive_members, archive_read, needs_root, rpack, run_cli

from packer import ldcache, runtime

NOTE_SOURCE = r"""
#define JSON "[{\"soname\":[\"libnotthere.so.9\",\"libz.so.1\"],\"priority\":\"recommended\"," \
             "\"feature\":\"compression\"}]"
__attribute__((used, section(".note.dlopen"), aligned(4)))
static const struct {
    unsigned namesz, descsz, type; char name[4]; char desc[(sizeof JSON + 3) & ~3];
} note = {4, sizeof JSON, 0x407c0c0a, "FDO", JSON};
int main(void) { return 0; }
"""


def deps(*args: str | Path) -> dict[str, dict[str, str]]:
    done = rpack("deps", "--json", *args)
    assert done.returncode == 0, done.stderr
    return {f["path"]: f for f in json.loads(done.stdout)["files"]}


def test_nsswitch_keeps_only_packed_services() -> None:
    text = ("passwd: files systemd\ngroup: files [NOTFOUND=return] sss [!UNAVAIL=return]\n"
            "netgroup: nis\n# comment\nhosts: files mdns4_minimal [NOTFOUND=return] dns\n")
    conf = runtime.nsswitch_conf(text, lambda s: s in ("files", "dns", "systemd")).decode()
    lines = [line.split() for line in conf.splitlines() if not line.startswith("#")]
    assert lines == [["passwd:", "files", "systemd"], ["group:", "files", "[NOTFOUND=return]"],
                     ["hosts:", "files", "dns"]]


def test_glibc_programs_bring_their_runtime_libraries() -> None:
    files = deps("/bin/sh")
    gcc_s = [f for p, f in files.items() if p.endswith("/libgcc_s.so.1")]
    assert gcc_s and gcc_s[0]["kind"] == "runtime" and "R72" in gcc_s[0]["why"]
    assert files["/etc/nsswitch.conf"]["kind"] == "generated"
    assert files["/usr/lib/locale/C.utf8/LC_CTYPE"]["kind"] == "runtime"
    # iconv and terminfo only for the programs that use them.
    assert not any("/gconv/" in p or "terminfo" in p for p in files)
    iconv = deps("/usr/bin/iconv")
    assert iconv["/usr/lib/x86_64-linux-gnu/gconv/gconv-modules.cache"]["kind"] == "runtime"
    assert "iconv_open" in iconv["/usr/lib/x86_64-linux-gnu/gconv/ISO8859-1.so"]["why"]
    less = deps("/usr/bin/less")
    assert any(p.endswith("/x/xterm-256color") for p in less)


def test_packed_nsswitch_and_cache_name_only_packed_libraries(tmp_path: Path) -> None:
    out = tmp_path / "id.tar.zst"
    assert rpack("create", out, "/usr/bin/id").returncode == 0
    members = archive_members(out)
    names = {path.rsplit("/", 1)[-1] for path in members}
    conf = archive_read(out, "etc/nsswitch.conf").decode()
    services = {word for line in conf.splitlines() if ":" in line and not line.startswith("#")
                for word in line.split()[1:] if not word.startswith("[")}
    assert "files" in services
    for service in services - {"files", "dns"}:
        assert f"libnss_{service}.so.2" in names, conf
    cache = ldcache.parse_cache(archive_read(out, "etc/ld.so.cache"))
    keys = {entry.key for entry in cache}
    assert "libgcc_s.so.1" in keys
    assert {f"libnss_{s}.so.2" for s in services - {"files", "dns"}} <= keys
    for entry in cache:
        assert entry.value.rsplit("/", 1)[-1] in names, entry.value


def test_static_programs_get_no_runtime_files(tmp_path: Path) -> None:
    source = tmp_path / "s.c"
    source.write_text("int main(void) { return 0; }\n")
    subprocess.run(["gcc", "-static", "-o", str(tmp_path / "s"), str(source)], check=True)
    assert [f["kind"] for f in deps(tmp_path / "s").values()] == ["program"]


def test_dlopen_notes_bring_the_first_soname_found(tmp_path: Path) -> None:
    source = tmp_path / "note.c"
    source.write_text(NOTE_SOURCE)
    subprocess.run(["gcc", "-o", str(tmp_path / "note"), str(source)], check=True)
    files = deps(tmp_path / "note")
    libz = [f for p, f in files.items() if p.endswith("/libz.so.1")]
    assert libz and libz[0]["kind"] == "runtime" and "compression" in libz[0]["why"]


def test_interpreters_bring_their_standard_library() -> None:
    python = deps("/usr/bin/python3")
    assert python["/usr/lib/python3.11/json/__init__.py"]["kind"] == "runtime"
    assert not any("/config-3.11" in p for p in python)
    ssl = [f for p, f in python.items() if "/libssl.so" in p]
    assert ssl and ssl[0]["kind"] == "runtime"
    perl = deps("/usr/bin/perl")
    assert any(p.endswith("/POSIX.pm") for p in perl)


def test_an_embedded_libpython_brings_its_standard_library() -> None:
    # gdb links libpython3.11 and aborts at start-up without encodings/ and the rest.
    gdb = deps("/usr/bin/gdb")
    encodings = gdb["/usr/lib/python3.11/encodings/__init__.py"]
    assert encodings["kind"] == "runtime" and "libpython3.11.so" in encodings["why"]
    assert "/usr/lib/python3.11/os.py" not in deps("/bin/sh")


# --- in the root --------------------------------------------------------------------------


@pytest.fixture(scope="module")
def archives() -> Iterator[dict[str, Path]]:
    # Not under tmp_path: nobody must reach the archives and the latin1 file.
    where = Path(tempfile.mkdtemp(prefix="rpack-runtime-test-"))
    where.chmod(0o755)
    (where / "latin1.txt").write_bytes("caf\u00e9 na\u00efve\n".encode("latin-1"))
    made = {}
    for name, programs in {
        "iconv": ["/usr/bin/iconv"],
        "ident": ["/usr/bin/id", "/usr/bin/whoami", "/usr/bin/getent"],
        "perl": ["/usr/bin/perl"],
        "python": ["/usr/bin/python3", "/usr/bin/less"],
    }.items():
        made[name] = where / f"{name}.tar.zst"
        done = rpack("create", made[name], *programs)
        assert done.returncode == 0, done.stderr
        made[name].chmod(0o644)
    made["data"] = where
    yield made
    shutil.rmtree(where)




@needs_root
@pytest.mark.heavy
@pytest.mark.parametrize("mode", ["root", "nobody"])
def test_runtime_loads_work_in_the_root(archives: dict[str, Path], mode: str) -> None:
    done = run_cli(mode, "run", "--bind", f"{archives['data']}:/data:ro", archives["iconv"],
                  "-f", "latin1", "-t", "utf-8", "/data/latin1.txt")
    assert (done.returncode, done.stdout) == (0, "caf\u00e9 na\u00efve\n"), done.stderr
    done = run_cli(mode, "run", archives["perl"], "-MPOSIX", "-e", "print floor(2.5)")
    assert (done.returncode, done.stdout) == (0, "2"), done.stderr
    done = run_cli(mode, "run", archives["python"], "-c",
                  "import ssl, sqlite3, json, ctypes, hashlib, locale, curses\n"
                  "print(locale.setlocale(locale.LC_ALL, 'C.UTF-8'))\n"
                  "curses.setupterm('xterm-256color', 1)\n"
                  "print(curses.tigetnum('colors'))")
    assert (done.returncode, done.stdout) == (0, "C.UTF-8\n256\n"), done.stderr


@needs_root
@pytest.mark.parametrize("mode", ["root", "nobody"])
def test_identity_and_names_resolve_in_the_root(archives: dict[str, Path], mode: str) -> None:
    """peers.md section 3, scenarios 11 and 47: NSS in the bundle."""
    def run(program: str, *args: str) -> str:
        done = run_cli(mode, "run", "--entrypoint", program, archives["ident"], *args)
        assert done.returncode == 0, (program, args, done.stderr)
        return done.stdout

    # The uid inside is the runner's choice; what matters is that it has a name.
    assert re.match(r"uid=\d+\([^)]+\) gid=\d+\([^)]+\)", run("/usr/bin/id"))
    assert run("/usr/bin/whoami").strip() == run("/usr/bin/id", "-un").strip()
    assert run("/usr/bin/getent", "passwd", "root").startswith("root:x:0:0:")
    assert run("/usr/bin/getent", "hosts", "localhost").split()[-1] == "localhost"
