"""Decompression bombs in several formats, written small: what they declare or expand to is huge.

Each builder returns the file's bytes. The PNG data of zeros compresses about 1000:1,
so a bomb that decodes to hundreds of MiB is a few hundred KiB on disk.
"""

from __future__ import annotations

import struct
import zlib


def _chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)


def png(width: int, height: int, rgba: bool = True, full: bool = True) -> bytes:
    """A valid PNG of zeros (RGBA or greyscale); ``full=False`` writes one row of data only."""
    channels, colour = (4, 6) if rgba else (1, 0)
    row = bytes(1 + width * channels)  # filter byte 0, then the row
    comp = zlib.compressobj(9)
    body = [comp.compress(row) for _ in range(height if full else 1)]
    body.append(comp.flush())
    ihdr = struct.pack(">IIBBBBB", width, height, 8, colour, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + _chunk(b"IHDR", ihdr) + _chunk(b"IDAT", b"".join(body)) + _chunk(b"IEND", b"")


def gif(width: int = 65535, height: int = 65535) -> bytes:
    """A GIF whose logical screen and one frame declare ``width`` x ``height``, with a few bytes of data."""
    head = b"GIF89a" + struct.pack("<HHBBB", width, height, 0x80, 0, 0) + bytes(6)  # 2-colour table
    frame = b"\x2c" + struct.pack("<HHHHB", 0, 0, width, height, 0) + b"\x02\x02\x4c\x01\x00"
    return head + frame + b"\x3b"


def icns(embedded: bytes) -> bytes:
    """An Apple icon whose 256 x 256 slot (``ic08``) holds ``embedded`` (a PNG of any declared size)."""
    element = b"ic08" + struct.pack(">I", 8 + len(embedded)) + embedded
    return b"icns" + struct.pack(">I", 8 + len(element)) + element


def ico(embedded: bytes) -> bytes:
    """A Windows icon whose one 256 x 256 entry holds ``embedded`` (a PNG of any declared size)."""
    header = struct.pack("<HHH", 0, 1, 1)
    entry = struct.pack("<BBBBHHII", 0, 0, 0, 0, 1, 32, len(embedded), 6 + 16)
    return header + entry + embedded
