"""Encoded image bytes in, (size, size, 3) uint8 RGB arrays out, or a skip reason that says why not.

Runs in CPU tasks, once per image; every encoder of the job then works on the same
decoded pixels. Converts CMYK, 16-bit, palette, greyscale and alpha images to RGB
(alpha composited on white), uses JPEG ``draft`` to decode large JPEGs at reduced
scale, and refuses images above a pixel limit before decoding them.
"""

from __future__ import annotations

import io
import warnings
from functools import lru_cache
from typing import Any

import numpy as np

from clipscan import fs as cfs


class SkipImage(Exception):
    """An image that cannot be used; ``str(e)`` is the reason recorded in ``skipped.parquet``."""


def _to_rgb(img: Any) -> tuple[Any, str | None]:
    """Return an RGB image and a note naming the conversion (None when it was RGB already)."""
    from PIL import Image

    mode = img.mode
    if mode == "RGB":
        return img, None
    if mode in ("I;16", "I;16B", "I;16L", "I", "F"):
        arr = np.asarray(img, dtype=np.float64)
        top = 65535.0 if mode.startswith("I;16") or arr.max() > 255 else 255.0
        arr = np.clip(arr / top * 255.0 + 0.5, 0, 255).astype(np.uint8)
        return Image.fromarray(arr, "L").convert("RGB"), f"{mode}->RGB"
    if mode == "P":
        img = img.convert("RGBA")
        mode = "P"
    if img.mode in ("RGBA", "LA", "PA", "La", "RGBa"):
        rgba = img.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB"), f"{mode}->RGB"
    return img.convert("RGB"), f"{mode}->RGB"


def decode_image(data: bytes, size: int, max_pixels: int) -> tuple[np.ndarray, str | None]:
    """Decode ``data`` to (size, size, 3) uint8: shortest side resized to ``size``, centre crop.

    Returns the pixels and a conversion note; raises ``SkipImage`` with the reason.
    """
    from PIL import Image, UnidentifiedImageError

    if not data:
        raise SkipImage("zero-byte file")
    Image.MAX_IMAGE_PIXELS = None  # the limit below is ours and is checked before decoding
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            img = Image.open(io.BytesIO(data))
            w, h = img.size
            if w * h > max_pixels:
                raise SkipImage(
                    f"image is {w}x{h} = {w * h} pixels, above the limit of {max_pixels} "
                    "(data.max_pixels; possible decompression bomb)"
                )
            if img.format == "JPEG":
                img.draft("RGB", (size, size))
            img.load()
            img, note = _to_rgb(img)
    except SkipImage:
        raise
    except UnidentifiedImageError as e:
        raise SkipImage("not an image: the format cannot be identified") from e
    except (OSError, SyntaxError, ValueError, EOFError) as e:
        raise SkipImage(f"corrupt or truncated image: {e}") from e
    w, h = img.size
    scale = size / min(w, h)
    nw, nh = max(size, round(w * scale)), max(size, round(h * scale))
    img = img.resize((nw, nh), Image.Resampling.BICUBIC, reducing_gap=3.0)
    left, top = (nw - size) // 2, (nh - size) // 2
    img = img.crop((left, top, left + size, top + size))
    return np.asarray(img, dtype=np.uint8), note


@lru_cache(maxsize=16)
def _filesystem(scheme_and_host: str) -> Any:
    return cfs.resolve(scheme_and_host)[0]


def read_image_bytes(uri: str) -> bytes:
    """Bytes of the image at a local path or object-storage URI; ``SkipImage`` if it is missing."""
    try:
        if cfs.is_uri(uri):
            scheme, rest = uri.split("://", 1)
            fsys = _filesystem(f"{scheme}://{rest.split('/', 1)[0]}")
            inner = cfs.resolve(uri)[1]
        else:
            fsys, inner = cfs.resolve(uri)
        with fsys.open_input_file(inner) as f:
            return bytes(f.read())
    except FileNotFoundError as e:
        raise SkipImage(f"missing file: {uri}") from e
    except IsADirectoryError as e:
        raise SkipImage(f"not a file: {uri}") from e
    except OSError as e:
        text = str(e)
        if "not found" in text.lower() or "No such file" in text or "does not exist" in text:
            raise SkipImage(f"missing file: {uri}") from e
        raise SkipImage(f"cannot read {uri}: {text}") from e


class Decode:
    """Batch stage: rows with ``uri`` (and optional ``image_bytes``) -> rows with ``pixels`` (n, S, S, 3) uint8.

    Rows already skipped pass through untouched; a row that fails to decode gets
    ``skip_stage="decode"`` and its reason. Pixels of skipped rows are zeros.
    """

    needs = ("id", "uri", "skip_stage", "skip_reason")

    def __init__(self, size: int, max_pixels: int) -> None:
        self.size = size
        self.max_pixels = max_pixels

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        require(batch, self.needs, "decode")
        n = len(batch["id"])
        pixels = np.zeros((n, self.size, self.size, 3), dtype=np.uint8)
        stage = list(batch["skip_stage"])
        reason = list(batch["skip_reason"])
        notes = list(batch["notes"]) if "notes" in batch else [""] * n
        blobs = batch.get("image_bytes")
        for i in range(n):
            if stage[i]:
                continue
            try:
                data = blobs[i] if blobs is not None and blobs[i] is not None else read_image_bytes(str(batch["uri"][i]))
                pixels[i], note = decode_image(bytes(data), self.size, self.max_pixels)
                if note:
                    notes[i] = f"{notes[i]},{note}" if notes[i] else note
            except SkipImage as e:
                stage[i], reason[i] = "decode", str(e)
        out = {k: v for k, v in batch.items() if k != "image_bytes"}
        out.update(
            pixels=pixels,
            skip_stage=np.array(stage, dtype=object),
            skip_reason=np.array(reason, dtype=object),
            notes=np.array(notes, dtype=object),
        )
        return out


def require(batch: dict[str, Any], keys: tuple[str, ...], stage: str) -> None:
    """Fail with the stage name, the missing keys and the keys present."""
    missing = [k for k in keys if k not in batch]
    if missing:
        raise KeyError(f"stage {stage!r} needs columns {missing}; the batch has {sorted(batch)}")
