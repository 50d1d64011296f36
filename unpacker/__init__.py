"""Safe streaming extraction of rpack archives: a zstd-compressed pax tar of a root filesystem."""

from unpacker.errors import UnpackError
from unpacker.extract import extract
from unpacker.limits import Limits

__all__ = ["Limits", "UnpackError", "extract"]
