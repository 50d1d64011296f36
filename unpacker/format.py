"""Names and limits of the rpack archive format, shared by the writer and the readers."""

FORMAT = "rpack/1"
MANIFEST_PATH = ".rpack/manifest.json"
MANIFEST_MAX_SIZE = 16 * 1024 * 1024

# zstd and `tar --zstd` decode windows up to 2**27 with their defaults (format.md section 1).
WINDOW_LOG_MAX = 27
