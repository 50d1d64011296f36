"""The zstd layer: a decompressing reader whose input is checked frame by frame for completeness."""

from typing import IO, BinaryIO, cast

import zstandard

from unpacker.errors import UnpackError
from unpacker.format import WINDOW_LOG_MAX

FRAME_MAGIC = 0xFD2FB528
SKIPPABLE_MAGIC = 0x184D2A50  # the 16 values 0x184D2A50..5F
MAX_WINDOW = 1 << WINDOW_LOG_MAX
SOURCE_CHUNK = 1 << 20

# What the checker expects next in the compressed bytes.
_MAGIC, _DESCRIPTOR, _HEADER_REST, _BLOCK_HEADER, _CHECKSUM = range(5)


def open_stream(checker: "FrameChecker") -> zstandard.ZstdDecompressionReader:
    """Return a reader of the decompressed bytes of the frames `checker` passes through."""
    decompressor = zstandard.ZstdDecompressor(max_window_size=MAX_WINDOW)
    # The checker is a duck-typed binary source: read() is all python-zstandard calls.
    return decompressor.stream_reader(
        cast(IO[bytes], checker), read_across_frames=True, closefd=False
    )


class FrameChecker:
    """A pass-through source that follows the zstd frame structure (RFC 8878) of its bytes.

    python-zstandard's stream_reader reports a clean end of stream when its input stops in the
    middle of a frame, even when only the 4-byte checksum is missing (security.md section 2.4).
    This wrapper walks the same bytes the decoder sees: frame headers, block headers and block
    sizes, the checksum. At end of input it knows whether the last frame was complete, and it
    refuses on the spot what the format excludes: frames without a content checksum, windows
    over 2**27, skippable frames, and bytes that are not a frame at all. It never decompresses
    or buffers more than a frame header; the decoder stays the authority on the contents.
    """

    def __init__(self, source: BinaryIO) -> None:
        self._source = source
        self._state = _MAGIC
        self._want = 4  # bytes of the current header field still to collect
        self._field = bytearray()
        self._skip = 0  # bytes of block content (or checksum) to pass over
        self._last_block = False
        self._descriptor_byte = 0
        self._frames = 0
        self._eof = False
        self.compressed_bytes = 0

    def read(self, size: int = -1) -> bytes:
        """Read from the source, check the bytes, and hand them on unchanged.

        The bytes of a frame's magic number are held back until all four have been checked:
        stray bytes after the last frame are refused here, never parsed by the decoder.
        """
        while not self._eof:
            held = bytes(self._field) if self._state == _MAGIC else b""
            data = self._source.read(size if size > 0 else SOURCE_CHUNK)
            if not data:
                self._eof = True
                self._check_boundary()
                return b""
            self.compressed_bytes += len(data)
            self._feed(data)
            out = held + data
            if self._state == _MAGIC and self._field:
                out = out[: -len(self._field)]
            if out:
                return out
        return b""

    def check_complete(self) -> None:
        """Require that the whole source was read and ended exactly at a frame boundary."""
        if not self._eof and self.read(SOURCE_CHUNK):
            raise UnpackError("data after end of archive")
        self._check_boundary()

    def _check_boundary(self) -> None:
        if self._state == _MAGIC and not self._skip:
            # One to three bytes: the start of a frame cut short, or not a frame at all.
            if self._field and not FRAME_MAGIC.to_bytes(4, "little").startswith(self._field):
                if self._frames == 0:
                    raise UnpackError("not a zstd archive")
                raise UnpackError("data after end of archive (not a zstd frame)")
            if not self._field:
                if self._frames == 0:
                    raise UnpackError("empty archive")
                return
        raise UnpackError("truncated archive (zstd frame incomplete)")

    def _feed(self, data: bytes) -> None:
        pos, end = 0, len(data)
        while pos < end:
            if self._skip:
                step = min(self._skip, end - pos)
                self._skip -= step
                pos += step
                if not self._skip:
                    self._skipped()
                continue
            step = min(self._want - len(self._field), end - pos)
            self._field += data[pos : pos + step]
            pos += step
            if len(self._field) == self._want:
                field = bytes(self._field)
                self._field.clear()
                self._collected(field)

    def _expect(self, state: int, want: int) -> None:
        self._state, self._want = state, want

    def _collected(self, field: bytes) -> None:
        if self._state == _MAGIC:
            self._magic(int.from_bytes(field, "little"))
        elif self._state == _DESCRIPTOR:
            self._descriptor(field[0])
        elif self._state == _HEADER_REST:
            self._header_rest(field)
        elif self._state == _BLOCK_HEADER:
            self._block_header(int.from_bytes(field, "little"))

    def _magic(self, magic: int) -> None:
        if magic == FRAME_MAGIC:
            self._expect(_DESCRIPTOR, 1)
            return
        if magic & 0xFFFFFFF0 == SKIPPABLE_MAGIC:
            raise UnpackError("skippable zstd frame refused")
        if self._frames == 0:
            raise UnpackError("not a zstd archive")
        raise UnpackError("data after end of archive (not a zstd frame)")

    def _descriptor(self, fhd: int) -> None:
        if fhd & 0x08:
            raise UnpackError("corrupt archive (reserved bit set in zstd frame header)")
        if fhd & 0x10:
            # Decoders ignore it and no encoder sets it: a flipped bit libzstd would not see.
            raise UnpackError("corrupt archive (unused bit set in zstd frame header)")
        if not fhd & 0x04:
            raise UnpackError("zstd frame has no content checksum")
        self._descriptor_byte = fhd
        single_segment = bool(fhd & 0x20)
        fcs_size = (1 if single_segment else 0, 2, 4, 8)[fhd >> 6]
        did_size = (0, 1, 2, 4)[fhd & 0x03]
        rest = (0 if single_segment else 1) + did_size + fcs_size
        self._expect(_HEADER_REST, rest)

    def _header_rest(self, field: bytes) -> None:
        fhd = self._descriptor_byte
        if fhd & 0x20:
            # Single segment: the window is the content size, which ends the header.
            fcs_size = (1, 2, 4, 8)[fhd >> 6]
            window = int.from_bytes(field[-fcs_size:], "little") + (256 if fcs_size == 2 else 0)
        else:
            exponent, mantissa = field[0] >> 3, field[0] & 0x07
            base = 1 << (10 + exponent)
            window = base + (base >> 3) * mantissa
        if window > MAX_WINDOW:
            raise UnpackError(f"zstd window of {window} bytes exceeds {MAX_WINDOW} bytes")
        self._frames += 1
        self._expect(_BLOCK_HEADER, 3)

    def _block_header(self, header: int) -> None:
        self._last_block = bool(header & 1)
        block_type, block_size = (header >> 1) & 0x03, header >> 3
        if block_type == 3:
            raise UnpackError("corrupt archive (reserved zstd block type)")
        self._skip = 1 if block_type == 1 else block_size
        if not self._skip:
            self._skipped()

    def _skipped(self) -> None:
        """Move on once a block's content, or a frame's checksum, has gone past."""
        if self._state == _CHECKSUM:
            self._expect(_MAGIC, 4)
        elif self._last_block:
            self._state, self._skip = _CHECKSUM, 4
        # else: the next block header is due; state and want are still _BLOCK_HEADER, 3.
