"""``py:`` probe models with a known bias, for the bias job's tests: their strength is set by construction.

Text: a caption's embedding is the weighted sum of one fixed vector per word (a colour
word: its colour's image axis; any other word: a seeded random vector).
``first_token`` weights the word at position t by ``DECAY ** t`` (the first-named object
dominates); ``even`` weights every word alike (word order changes nothing). Image: one
axis per palette colour (objects in a probe scene differ in colour), weighted by the
colour's pixel count (``by_area``: the largest object dominates) or by presence alone
(``by_presence``: every object counts the same, so a scene ties between its objects).
"""

from __future__ import annotations

import re
import zlib

import numpy as np

from clipscan.data.scenes import PALETTE

DIM = 64
DECAY = 0.6
COLOURS = np.array(list(PALETTE.values()), dtype=np.float32)  # (11, 3)


def _word(word: str) -> np.ndarray:
    if word in PALETTE:  # colour words on the image's colour axes, so matching an image to a caption means something
        v = np.zeros(DIM, dtype=np.float32)
        v[list(PALETTE).index(word)] = 1.0
        return v
    rng = np.random.default_rng(zlib.crc32(word.encode()))
    v = rng.standard_normal(DIM).astype(np.float32)
    return v / np.linalg.norm(v)


def _text(texts: list[str], decay: float) -> np.ndarray:
    out = np.zeros((len(texts), DIM), dtype=np.float32)
    for i, text in enumerate(texts):
        for t, word in enumerate(re.findall(r"[a-z]+", text.lower())):
            out[i] += decay**t * _word(word)
    return out


def _colour_areas(images: list) -> np.ndarray:
    """(n, 11) pixels of each palette colour (exact up to a small tolerance: the probe images are PNG)."""
    out = np.zeros((len(images), len(COLOURS)), dtype=np.float32)
    for i, image in enumerate(images):
        px = np.asarray(image.convert("RGB"), dtype=np.float32).reshape(-1, 1, 3)
        dist = np.abs(px - COLOURS[None]).sum(axis=2)  # (pixels, 11)
        near = dist.argmin(axis=1)
        ok = dist.min(axis=1) < 30
        out[i] = np.bincount(near[ok], minlength=len(COLOURS))
    return out


def _image(images: list, by_area: bool) -> np.ndarray:
    areas = _colour_areas(images)
    weights = areas if by_area else (areas > 0).astype(np.float32)
    out = np.zeros((len(images), DIM), dtype=np.float32)
    out[:, : len(COLOURS)] = weights
    out[:, DIM - 1] = 1e-3  # never an all-zero vector
    return out


class Probe:
    def __init__(self, text_decay: float, by_area: bool) -> None:
        self.text_decay, self.by_area = text_decay, by_area

    def embed_images(self, images: list) -> np.ndarray:
        return _image(images, self.by_area)

    def embed_texts(self, texts: list[str]) -> np.ndarray:
        return _text(texts, self.text_decay)


class ImageOnly:
    def embed_images(self, images: list) -> np.ndarray:
        return _image(images, by_area=True)


def first_token_by_area() -> Probe:
    """Text weights words by position, image weights objects by area: both biases at full strength."""
    return Probe(DECAY, by_area=True)


def even_by_presence() -> Probe:
    """Text weights every word alike, image every object alike: neither bias."""
    return Probe(1.0, by_area=False)


def image_only_by_area() -> ImageOnly:
    """No text tower; image weights objects by area."""
    return ImageOnly()
