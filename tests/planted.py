"""Models with a planted blind spot, for ``py:tests.planted:...`` specs.

Both see where the scene generator's objects are (pixels near a palette colour; the
backgrounds are kept far from the palette). The reference also sees which colours they
have; the probe does not, so two scenes that differ only in an object's colour look the
same to it.
"""

from __future__ import annotations

import numpy as np
from PIL import Image

from clipscan.data.scenes import PALETTE

COLOURS = np.array(list(PALETTE.values()), dtype=np.float32)  # (11, 3)


def _analyse(images: list[Image.Image]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Object masks at 16 and 8 cells a side (centred, L2-normalised) and the set of colours present."""
    x = np.stack([np.asarray(i.convert("RGB"), dtype=np.float32) for i in images])  # (n, H, W, 3)
    dist = np.linalg.norm(x[:, :, :, None, :] - COLOURS[None, None, None], axis=-1)  # (n, H, W, 11)
    nearest = dist.argmin(-1)
    on_object = dist.min(-1) < 45.0
    n, h, w = on_object.shape

    def layout(cells: int) -> np.ndarray:
        m = on_object.reshape(n, cells, h // cells, cells, w // cells).mean(axis=(2, 4)).reshape(n, -1)
        return _l2(m - m.mean(axis=1, keepdims=True))

    counts = np.stack([(on_object & (nearest == c)).sum(axis=(1, 2)) for c in range(len(COLOURS))], axis=1)
    return layout(16), layout(8), _l2((counts > 20).astype(np.float32))


def _l2(a: np.ndarray) -> np.ndarray:
    return a / np.maximum(np.linalg.norm(a, axis=1, keepdims=True), 1e-9)


class ColourBlind:
    """Sees where the objects are, at a fine grid; not their colours."""

    image_size = 64

    def embed_images(self, images: list[Image.Image]) -> np.ndarray:
        return _analyse(images)[0]


class ColourSeeing:
    """Sees where the objects are, at a coarser grid, and which colours they have."""

    image_size = 64

    def embed_images(self, images: list[Image.Image]) -> np.ndarray:
        _, coarse, colours = _analyse(images)
        return np.concatenate([coarse, colours], axis=1)


def colour_blind() -> ColourBlind:
    return ColourBlind()


def colour_seeing() -> ColourSeeing:
    return ColourSeeing()


class Slow:
    """Sees pixels through a fixed random projection, slowly: long enough to kill a job mid-stage."""

    image_size = 16
    delay_s = 0.03  # per image

    def __init__(self) -> None:
        self.weights = np.random.default_rng(0).standard_normal((16 * 16 * 3, 24)).astype(np.float32)

    def embed_images(self, images: list[Image.Image]) -> np.ndarray:
        import time

        time.sleep(self.delay_s * len(images))
        x = np.stack([np.asarray(i.convert("RGB"), dtype=np.float32).reshape(-1) / 255.0 for i in images])
        return x @ self.weights


def slow() -> Slow:
    return Slow()


class SlowClip(Slow):
    """``Slow`` with a text tower: each caption a fixed pseudo-random vector seeded by its bytes."""

    delay_s = 0.015  # TCAC scores 1 + T versions of each image

    def embed_texts(self, texts: list[str]) -> np.ndarray:
        import hashlib

        seeds = [int.from_bytes(hashlib.blake2b(t.encode(), digest_size=8).digest(), "little") for t in texts]
        return np.stack([np.random.default_rng(s).standard_normal(24) for s in seeds]).astype(np.float32)


def slow_clip() -> SlowClip:
    return SlowClip()
