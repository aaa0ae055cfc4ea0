"""Scene images in; pixel descriptors out, with one kind of fact left out: models with a planted blind spot.

For ``py:clipscan.models.planted:NAME`` specs, offline and deterministic: a check that
DAF's attribute contrast finds a blind spot known in advance. Every model finds the scene
generator's objects (pixels near a palette colour; backgrounds are kept far from it),
separates them into connected parts, and describes the scene by blocks: ``colour`` (the
object colours present and the background colours), ``count`` (how many objects),
``size`` (the size classes present, from each object's bounding circle) and ``position``
(the thirds of the image its objects' centres lie in), each block L2-normalised. None of
them sees shapes. ``sees_all`` uses every block; ``blind_colour`` (as if it looked at a
grayscale copy), ``blind_count``, ``blind_size`` and ``blind_position`` drop one.
``sees_all_noisy`` sees every block plus a little noise drawn from a hash of the pixels:
the same facts, other near-ties, for the check that a probe seeing everything shows no
blind spot.
"""

from __future__ import annotations

import numpy as np
from PIL import Image

from clipscan.data.scenes import BACKGROUND_COLOURS, PALETTE

BLOCKS = ("colour", "count", "size", "position")
_OBJECT_RGB = np.array(list(PALETTE.values()), dtype=np.float32)  # (11, 3)
_BACKGROUND_RGB = np.array(list(BACKGROUND_COLOURS.values()), dtype=np.float32)  # (6, 3)
_ON_OBJECT = 45.0  # RGB distance to a palette colour that counts as object; backgrounds are >= 90 away
_MIN_PIXELS = 0.002  # smaller parts are JPEG specks, fraction of the image area
_SIZE_EDGES = (0.20, 0.30)  # bounding-circle diameter between the generator's small/medium/large classes


def describe(images: np.ndarray) -> dict[str, np.ndarray]:
    """(n, H, W, 3) uint8 RGB scenes -> block name -> (n, d_block) float32, each row L2-normalised."""
    x = np.asarray(images, dtype=np.float32)
    n, h, w, _ = x.shape
    dist = np.linalg.norm(x[..., None, :] - _OBJECT_RGB, axis=-1)  # (n, H, W, 11)
    colour = dist.argmin(-1)
    on = dist.min(-1) < _ON_OBJECT
    labels = _components(on, colour)
    blocks: dict[str, list[np.ndarray]] = {b: [] for b in BLOCKS}
    bg_dist = np.linalg.norm(x[..., None, :] - _BACKGROUND_RGB, axis=-1).argmin(-1)  # (n, H, W)
    yy, xx = np.mgrid[0:h, 0:w]
    side = float(max(h, w))
    for i in range(n):
        present = np.zeros(len(_OBJECT_RGB), np.float32)
        sizes = np.zeros(3, np.float32)
        cells = np.zeros(9, np.float32)
        parts = 0
        for lab in np.unique(labels[i][labels[i] > 0]):
            m = labels[i] == lab
            if m.sum() < _MIN_PIXELS * h * w:
                continue
            parts += 1
            present[np.bincount(colour[i][m], minlength=len(_OBJECT_RGB)).argmax()] = 1
            cy, cx = yy[m].mean(), xx[m].mean()
            diameter = 2 * np.sqrt(((yy[m] - cy) ** 2 + (xx[m] - cx) ** 2).max()) / side
            sizes[int(np.searchsorted(_SIZE_EDGES, diameter))] = 1
            cells[3 * min(2, int(3 * (cy + 0.5) / h)) + min(2, int(3 * (cx + 0.5) / w))] = 1
        background = np.bincount(bg_dist[i][~on[i]], minlength=len(_BACKGROUND_RGB)).astype(np.float32)
        background = (background > 0.2 * max(1.0, background.sum())).astype(np.float32)
        count = np.zeros(6, np.float32)
        count[min(parts, 5)] = 1
        blocks["colour"].append(np.concatenate([present, background]))
        blocks["count"].append(count)
        blocks["size"].append(sizes)
        blocks["position"].append(cells)
    return {b: _l2(np.stack(v)) for b, v in blocks.items()}


def _components(on: np.ndarray, colour: np.ndarray) -> np.ndarray:
    """(n, H, W) labels of 4-connected parts of ``on`` of one colour, 0 off them; by repeated
    minimum over neighbours until nothing changes (objects are small, so few rounds)."""
    n, h, w = on.shape
    big = np.int64(h * w + 1)
    labels = np.where(on, np.arange(1, h * w + 1, dtype=np.int64).reshape(1, h, w), big)
    while True:
        before = labels
        best = labels.copy()
        for axis, step in ((1, 1), (1, -1), (2, 1), (2, -1)):
            shifted = np.roll(labels, step, axis=axis)
            same = np.roll(colour, step, axis=axis) == colour
            edge = np.zeros_like(on)
            if axis == 1:
                edge[:, 0 if step == 1 else -1, :] = True
            else:
                edge[:, :, 0 if step == 1 else -1] = True
            best = np.where(on & same & ~edge, np.minimum(best, shifted), best)
        labels = best
        if np.array_equal(labels, before):
            return np.where(on, labels, 0)


def _l2(a: np.ndarray) -> np.ndarray:
    return (a / np.maximum(np.linalg.norm(a, axis=1, keepdims=True), 1e-9)).astype(np.float32)


class Planted:
    """Scene descriptors with the blocks in ``sees`` (``BLOCKS`` order), concatenated, plus
    ``noise`` times a unit vector drawn from a hash of the image's pixels (0 = none)."""

    image_size = 64

    def __init__(self, sees: tuple[str, ...], noise: float = 0.0) -> None:
        unknown = sorted(set(sees) - set(BLOCKS))
        if unknown:
            raise ValueError(f"planted model: unknown blocks {unknown}; known: {BLOCKS}")
        self.sees = tuple(b for b in BLOCKS if b in sees)
        self.noise = float(noise)

    def embed_images(self, images: list[Image.Image]) -> np.ndarray:
        pixels = np.stack([np.asarray(i.convert("RGB")) for i in images])
        blocks = describe(pixels)
        x = np.concatenate([blocks[b] for b in self.sees], axis=1)
        if self.noise:
            x = x + self.noise * _l2(np.stack([_pixel_noise(p, x.shape[1]) for p in pixels]))
        return x.astype(np.float32)


def _pixel_noise(pixels: np.ndarray, d: int) -> np.ndarray:
    import hashlib

    seed = int.from_bytes(hashlib.blake2b(pixels.tobytes(), digest_size=8).digest(), "little")
    return np.random.default_rng(seed).standard_normal(d)


def sees_all() -> Planted:
    return Planted(BLOCKS)


def sees_all_noisy() -> Planted:
    return Planted(BLOCKS, noise=0.1)


def blind_colour() -> Planted:
    return Planted(tuple(b for b in BLOCKS if b != "colour"))


def blind_count() -> Planted:
    return Planted(tuple(b for b in BLOCKS if b != "count"))


def blind_size() -> Planted:
    return Planted(tuple(b for b in BLOCKS if b != "size"))


def blind_position() -> Planted:
    return Planted(tuple(b for b in BLOCKS if b != "position"))
