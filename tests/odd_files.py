"""Real files a decoder meets and cannot use: formats with no loader here, variants no decoder implements.

Each builder returns the file's bytes: valid files of their format, so the reason
recorded must say "unsupported format", never "corrupt or truncated".
"""

from __future__ import annotations

import io
import struct

from PIL import Image


def dds_unimplemented(dxgi_format: int = 93) -> bytes:
    """A 4 x 4 DDS texture in a DXGI format Pillow does not implement (93: BC6H_TYPELESS-like)."""
    header = struct.pack("<I", 124) + struct.pack("<3I", 0x1007, 4, 4) + bytes(12) + bytes(44)
    header += struct.pack("<4I", 32, 0x4, int.from_bytes(b"DX10", "little"), 0) + bytes(40)
    dx10 = struct.pack("<5I", dxgi_format, 3, 0, 1, 0)
    return b"DDS " + header[:124] + dx10 + bytes(16)


def eps() -> bytes:
    """A valid EPS file as Pillow writes it (rendering it needs Ghostscript)."""
    buf = io.BytesIO()
    Image.new("RGB", (16, 16), (200, 10, 10)).save(buf, "EPS")
    return buf.getvalue()


def wmf() -> bytes:
    """A placeable Windows Metafile header and an empty metafile (Pillow has no WMF loader off Windows)."""
    placeable = struct.pack("<IHhhhhHI", 0x9AC6CDD7, 0, 0, 0, 160, 160, 1440, 0)
    checksum = 0
    for (word,) in struct.iter_unpack("<H", placeable):
        checksum ^= word
    metafile = struct.pack("<HHHIHIH", 1, 9, 0x300, 12, 0, 3, 0) + struct.pack("<IH", 3, 0)
    return placeable + struct.pack("<H", checksum) + metafile


def grib() -> bytes:
    return b"GRIB" + b"\x00\x00\x20\x01" + bytes(24)


def bufr() -> bytes:
    return b"BUFR" + bytes(28)


def hdf5() -> bytes:
    return b"\x89HDF\r\n\x1a\n" + bytes(56)


UNSUPPORTED = {"dds93": dds_unimplemented, "eps": eps, "wmf": wmf, "grib": grib, "bufr": bufr, "hdf5": hdf5}
