"""Encoded JPEG bytes in, (size, size, 3) uint8 RGB arrays out, decoded on a GPU with nvJPEG in batches.

On GPU nodes CPU JPEG decoding is the published bottleneck of CLIP inference
(clip-retrieval's ViT-B/32 is decode-bound near 2,500 images/s per A100). ``GpuDecode``
sends every plain RGB or greyscale JPEG of a batch to ``torchvision.io.decode_jpeg`` on
the GPU in one call, then resizes (shortest side, bicubic with antialias) and
centre-crops there. Everything else (PNG, CMYK or 16-bit JPEGs, images above the pixel
limit, anything nvJPEG refuses) goes to the CPU ``Decode``, which records skips with
the same reasons as everywhere else.
"""

from __future__ import annotations

import io
import warnings
from typing import Any

import numpy as np

from clipscan.columns import require
from clipscan.stages.decode import Decode, SkipImage, read_image_bytes

GPU_MODES = ("RGB", "L")  # JPEG colour modes nvJPEG decodes to RGB; CMYK/YCCK go to the CPU


def gpu_decodable(data: bytes, max_pixels: int) -> bool:
    """Whether ``data`` is a JPEG that nvJPEG should decode: RGB or greyscale, within the pixel limit.

    Reads the header only (Pillow opens lazily); anything doubtful is left to the CPU path.
    """
    from PIL import Image

    if data[:3] != b"\xff\xd8\xff":
        return False
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            img = Image.open(io.BytesIO(data))
            w, h = img.size
            return img.format == "JPEG" and img.mode in GPU_MODES and 0 < w * h <= max_pixels
    except Exception:  # an unreadable header: the CPU path says why
        return False


def resize_crop(image: Any, size: int) -> Any:
    """(3, H, W) uint8 CUDA tensor -> (size, size, 3) uint8: shortest side to ``size``, centre crop."""
    import torch.nn.functional as F

    _, h, w = image.shape
    scale = size / min(w, h)
    nw, nh = max(size, round(w * scale)), max(size, round(h * scale))
    x = F.interpolate(image[None].float(), size=(nh, nw), mode="bicubic", antialias=True, align_corners=False)
    left, top = (nw - size) // 2, (nh - size) // 2
    x = x[0, :, top : top + size, left : left + size]
    return x.clamp_(0, 255).round_().to(dtype=image.dtype).permute(1, 2, 0)


class GpuDecode:
    """Batch stage like ``Decode`` (rows with ``uri`` or ``image_bytes`` -> ``pixels``), JPEGs on the GPU.

    ``fallback`` decodes on the CPU what the GPU does not; rows already skipped pass through.
    """

    needs = Decode.needs

    def __init__(self, size: int, max_pixels: int, fallback: Decode | None = None, device: str = "cuda") -> None:
        self.size, self.max_pixels, self.device = size, max_pixels, device
        self.fallback = fallback or Decode(size, max_pixels)
        self.gpu_rows = 0  # images decoded on the GPU so far (the rest went to the CPU)

    def decode_jpegs(self, blobs: list[bytes]) -> list[Any | None]:
        """nvJPEG over the whole list in one call; where the batch fails, one by one; None where one fails."""
        import torch
        from torchvision.io import ImageReadMode, decode_jpeg

        tensors = [torch.frombuffer(bytearray(b), dtype=torch.uint8) for b in blobs]
        try:
            return list(decode_jpeg(tensors, mode=ImageReadMode.RGB, device=self.device))
        except Exception:  # one bad stream fails the whole batched call: find it
            out: list[Any | None] = []
            for t in tensors:
                try:
                    out.append(decode_jpeg(t, mode=ImageReadMode.RGB, device=self.device))
                except Exception:
                    out.append(None)
            return out

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        require(batch, self.needs, "decode")
        n = len(batch["id"])
        stage = list(batch["skip_stage"])
        reason = list(batch["skip_reason"])
        blobs_in = batch.get("image_bytes")
        data: list[bytes | None] = [None] * n
        on_gpu: list[int] = []
        for i in range(n):
            if stage[i]:
                continue
            try:
                blob = blobs_in[i] if blobs_in is not None and blobs_in[i] is not None else None
                data[i] = bytes(blob) if blob is not None else read_image_bytes(str(batch["uri"][i]))
            except SkipImage as e:
                stage[i], reason[i] = "decode", str(e)
                continue
            if gpu_decodable(data[i], self.max_pixels):  # type: ignore[arg-type]
                on_gpu.append(i)
        pixels = np.zeros((n, self.size, self.size, 3), dtype=np.uint8)
        decoded = self.decode_jpegs([data[i] for i in on_gpu]) if on_gpu else []  # type: ignore[misc]
        done = set()
        for i, image in zip(on_gpu, decoded, strict=True):
            if image is not None:
                pixels[i] = resize_crop(image, self.size).cpu().numpy()
                done.add(i)
        self.gpu_rows += len(done)
        out = {k: v for k, v in batch.items() if k != "image_bytes"}
        rest = [i for i in range(n) if not stage[i] and i not in done]
        if rest:  # the CPU decodes the others, with its conversions, limits and reasons
            sub = {k: np.asarray(v)[rest] for k, v in out.items()}
            sub["image_bytes"] = np.array([data[i] for i in rest], dtype=object)
            sub["skip_stage"] = np.array([stage[i] for i in rest], dtype=object)
            sub["skip_reason"] = np.array([reason[i] for i in rest], dtype=object)
            cpu = self.fallback(sub)
            pixels[rest] = cpu["pixels"]
            for j, i in enumerate(rest):
                stage[i], reason[i] = cpu["skip_stage"][j], cpu["skip_reason"][j]
            if "notes" in cpu:
                notes = np.array(out.get("notes", np.array([""] * n, dtype=object)), dtype=object)
                notes[rest] = cpu["notes"]
                out["notes"] = notes
        out.update(pixels=pixels, skip_stage=np.array(stage, dtype=object),
                   skip_reason=np.array(reason, dtype=object))
        if "notes" not in out:
            out["notes"] = np.array([""] * n, dtype=object)
        return out
