"""Names and limits of the rpack archive format, shared by the writer and the readers."""

from collections.abc import Mapping
from types import MappingProxyType

FORMAT = "rpack/1"
MANIFEST_PATH = ".rpack/manifest.json"
MANIFEST_MAX_SIZE = 16 * 1024 * 1024

# zstd and `tar --zstd` decode windows up to 2**27 with their defaults (format.md section 1).
WINDOW_LOG_MAX = 27

# The PATH the packer stores in `env` unless told otherwise.
DEFAULT_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
# What a program starts with before the archive's `env` is applied: under `rpack run`, and in
# the config of an image made by `rpack export-oci`.
BASE_ENV: Mapping[str, str] = MappingProxyType({"PATH": DEFAULT_PATH, "HOME": "/"})
