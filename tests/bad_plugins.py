"""Pillow plugins that misbehave as real decoders do, registered on import (``data.image_plugins``).

Each claims files that start with its magic: ``RAISE`` raises an exception class no
caller could list, ``HANG`` never returns, ``GREEDY`` allocates until it is stopped,
``CRASH`` kills its own process (as the kernel's OOM killer would).
"""

from __future__ import annotations

import os
import signal
import time

from PIL import Image, ImageFile


class ExoticDecoderError(Exception):
    """Nobody's except clause names this."""


class _Misbehaving(ImageFile.ImageFile):
    format = "MISBEHAVING"
    format_description = "test plugin"

    def _open(self) -> None:
        assert self.fp is not None
        self.magic = self.fp.read(6).rstrip(b" ")
        self._mode = "RGB"
        self._size = (16, 16)

    def load(self) -> None:  # type: ignore[override]
        if self.magic == b"RAISE":
            raise ExoticDecoderError("unheard-of pixel layout 7")
        if self.magic == b"HANG":
            time.sleep(3600)
        if self.magic == b"GREEDY":
            hoard = []
            for _ in range(64):  # up to 16 GiB, each page touched
                hoard.append(bytearray(256 * 1024 * 1024))
        if self.magic == b"CRASH":
            os.kill(os.getpid(), signal.SIGKILL)


MAGICS = (b"RAISE ", b"HANG  ", b"GREEDY", b"CRASH ")


def _accept(prefix: bytes) -> bool:
    return prefix[:6] in MAGICS


Image.register_open(_Misbehaving.format, _Misbehaving, _accept)
