"""Safe streaming extraction of rpack archives: a zstd-compressed pax tar of a root filesystem."""

from unpacker.errors import UnpackError
from unpacker.extract import extract, extract_summary, extract_to
from unpacker.limits import Limits
from unpacker.listing import Listed, TarLines, list_members
from unpacker.source import open_archive
from unpacker.verify import Summary, inspect, verify

__all__ = ["Limits", "Listed", "Summary", "TarLines", "UnpackError", "extract", "extract_summary",
           "extract_to", "inspect", "list_members", "open_archive", "verify"]
