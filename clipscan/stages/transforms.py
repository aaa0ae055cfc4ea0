"""(S, S, 3) uint8 images and an image id in; the same images under seeded torchvision v2 transforms out.

TCAC (section 3.2 of "Unveiling Glitches") asks how the probe's caption ranking moves
under harmless changes: grayscale, rotation, affine, horizontal flip, invert,
perspective, elastic. Each transform is a ``torchvision.transforms.v2`` transform run
on a (3, S, S) uint8 tensor. Its randomness comes from torch's CPU generator seeded
with a stable hash of (seed, transform name, image id), so an image gets the same
pixels on every run, on any worker, in any batch; the report re-renders them from
the same seed.

Config: ``tcac.transforms`` maps a name to its parameters (torchvision argument
names). A name is one of ``TRANSFORMS`` or a ``torchvision.transforms.v2`` class name;
an ``op`` key picks the transform for any other name, e.g.
``rot0: {op: rotation, degrees: 0}`` (the identity, used by the tests).
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Mapping
from typing import Any

import numpy as np

# name -> (torchvision.transforms.v2 class, defaults where ours differ from torchvision's).
# The random flips, inversion and perspective fire with p = 1: at torchvision's p = 0.5
# half of the images would be scored unchanged and dilute every figure.
# Rotation and affine interpolate bilinearly (torchvision's default is nearest, which
# adds jagged edges) and see the image reflect-padded (``edges: reflect``), so the corners
# they uncover show mirrored content instead of a black wedge with a hard edge.
TRANSFORMS: dict[str, tuple[str, dict[str, Any]]] = {
    "grayscale": ("Grayscale", {"num_output_channels": 3}),
    "rotation": ("RandomRotation", {"interpolation": "bilinear"}),
    "affine": ("RandomAffine", {"interpolation": "bilinear"}),
    "hflip": ("RandomHorizontalFlip", {"p": 1.0}),
    "invert": ("RandomInvert", {"p": 1.0}),
    "perspective": ("RandomPerspective", {"p": 1.0}),
    "elastic": ("ElasticTransform", {}),
}


class TransformError(ValueError):
    """A ``tcac.transforms`` entry that cannot be built; the message names it and the cause."""


def transform_seed(image_id: str, name: str, seed: int) -> int:
    """A 63-bit seed for (image id, transform name, job seed), the same in every process.

    Python's ``hash()`` of a string changes per process (PYTHONHASHSEED); BLAKE2b does not.
    """
    digest = hashlib.blake2b(f"{int(seed)}\x1f{name}\x1f{image_id}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & (2**63 - 1)


def _seeded_elastic_class() -> type:
    """``v2.ElasticTransform`` whose displacement field is blurred with two 1-D passes.

    torchvision blurs each (H, W) noise field with a 2-D (8 sigma + 1)^2 kernel: 75 ms per
    224 px image on one core, more than the probe's forward pass. The same Gaussian as a
    row pass and a column pass (reflect padding separates along the axes too) gives the
    same field up to float rounding in a few milliseconds.
    """
    import torch
    import torch.nn.functional as F
    from torchvision.transforms import v2

    def kernel1d(size: int, sigma: float) -> torch.Tensor:
        # torchvision's own formula (functional._misc._get_gaussian_kernel1d)
        lim = (size - 1) / (2.0 * math.sqrt(2.0))
        x = torch.linspace(-lim, lim, steps=size, dtype=torch.float32)
        return torch.softmax(x.div(sigma).pow(2).neg(), dim=0)

    def blur(field: torch.Tensor, size: int, sigma: tuple[float, float]) -> torch.Tensor:
        half = size // 2
        kx = kernel1d(size, sigma[0]).view(1, 1, 1, size)
        ky = kernel1d(size, sigma[1]).view(1, 1, size, 1)
        field = F.conv2d(F.pad(field, [half, half, 0, 0], mode="reflect"), kx)
        return F.conv2d(F.pad(field, [0, 0, half, half], mode="reflect"), ky)

    class SeparableElastic(v2.ElasticTransform):  # type: ignore[misc]
        def make_params(self, flat_inputs: list[Any]) -> dict[str, Any]:
            height, width = v2.query_size(flat_inputs)
            fields = []
            for axis, extent in ((0, width), (1, height)):
                d = torch.rand(1, 1, height, width) * 2 - 1
                if self.sigma[axis] > 0.0:
                    size = int(8 * self.sigma[axis] + 1)
                    size += 1 - size % 2  # odd, as torchvision makes it
                    d = blur(d, size, (self.sigma[0], self.sigma[1]))
                fields.append(d * self.alpha[axis] / extent)
            return {"displacement": torch.concat(fields, 1).permute([0, 2, 3, 1])}

    return SeparableElastic


REFLECTED = ("RandomRotation", "RandomAffine")  # transforms that get ``edges: reflect`` by default
EDGES = ("reflect", "fill")


def build_transform(name: str, params: Mapping[str, Any]) -> Any:
    """The torchvision v2 transform for one ``tcac.transforms`` entry; raises ``TransformError``.

    ``interpolation`` may be a name (``nearest``, ``bilinear``, ``bicubic``). ``edges``:
    ``reflect`` (default for rotation and affine) runs the transform on the image
    reflect-padded by half its side and crops the centre back, so no constant fill and
    no edge enters the image (an affine ``translate`` keeps its meaning: fractions of the
    unpadded side); ``fill`` leaves torchvision's constant ``fill``.
    """
    from torchvision.transforms import v2

    params = dict(params)
    op = str(params.pop("op", name))
    cls_name, defaults = TRANSFORMS.get(op, (op, {}))
    edges = str(params.pop("edges", "reflect" if cls_name in REFLECTED else "fill"))
    if edges not in EDGES:
        raise TransformError(f"tcac.transforms.{name}: edges must be one of {EDGES}, got {edges!r}")
    if edges == "reflect" and cls_name not in REFLECTED:
        raise TransformError(f"tcac.transforms.{name}: edges: reflect applies to {REFLECTED} only, not {cls_name}")
    params = {**defaults, **params}
    if isinstance(params.get("interpolation"), str):
        mode = params["interpolation"].upper()
        if mode not in v2.InterpolationMode.__members__:
            raise TransformError(f"tcac.transforms.{name}: unknown interpolation {params['interpolation']!r}")
        params["interpolation"] = v2.InterpolationMode[mode]
    if edges == "reflect" and params.get("translate") is not None:
        params["translate"] = [float(t) / 2 for t in params["translate"]]  # the padded side is twice the image's
    if cls_name == "ElasticTransform":
        cls: Any = _seeded_elastic_class()
    else:
        cls = getattr(v2, cls_name, None)
        if not (isinstance(cls, type) and issubclass(cls, v2.Transform)):
            raise TransformError(
                f"tcac.transforms.{name}: unknown transform {op!r}; expected one of "
                f"{', '.join(TRANSFORMS)} or a torchvision.transforms.v2 class name"
            )
    try:
        built = cls(**params)
    except (TypeError, ValueError) as e:
        raise TransformError(f"tcac.transforms.{name}: {cls_name}({params}) failed: {e}") from e
    return Reflected(built) if edges == "reflect" else built


class Reflected:
    """Runs ``inner`` on a (3, H, W) uint8 image reflect-padded by half its side on every
    edge, then crops the centre (H, W) back: rotation and affine about the same centre,
    with mirrored content where they would uncover a constant fill."""

    def __init__(self, inner: Any) -> None:
        self.inner = inner

    def __call__(self, x: Any) -> Any:
        import torch.nn.functional as F

        _, h, w = x.shape
        ph, pw = h // 2, w // 2
        padded = F.pad(x[None].float(), (pw, pw, ph, ph), mode="reflect")[0].round().to(x.dtype)
        return self.inner(padded)[:, ph : ph + h, pw : pw + w]


class SeededTransforms:
    """Every configured transform of one job, applied with per-(image, transform) seeds.

    ``names`` keeps the config order; that order is the order of the versions returned
    by ``__call__`` and of the rows in ``tcac.parquet``.
    """

    def __init__(self, transforms: Mapping[str, Mapping[str, Any]], seed: int) -> None:
        if not transforms:
            raise TransformError("tcac.transforms is empty: name at least one transform")
        for name, params in transforms.items():
            if not isinstance(name, str) or not name.strip():
                raise TransformError(f"tcac.transforms: transform names must be non-empty strings, got {name!r}")
            if not isinstance(params, Mapping):
                raise TransformError(f"tcac.transforms.{name}: parameters must be a mapping, got {params!r}")
        self.names: tuple[str, ...] = tuple(transforms)
        self.seed = int(seed)
        self._transforms = {name: build_transform(name, params) for name, params in transforms.items()}

    def apply(self, image: np.ndarray, image_id: str, name: str) -> np.ndarray:
        """(S, S, 3) uint8 -> (S, S, 3) uint8: transform ``name`` with the seed of (image_id, name)."""
        import torch

        if image.ndim != 3 or image.shape[-1] != 3 or image.dtype != np.uint8:
            raise ValueError(f"transform {name}: expected an (H, W, 3) uint8 image, got {image.shape} {image.dtype}")
        x = torch.from_numpy(np.require(image, requirements=["C", "W"])).permute(2, 0, 1)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(transform_seed(image_id, name, self.seed))
            y = self._transforms[name](x)
        if y.dtype != torch.uint8 or tuple(y.shape) != tuple(x.shape):
            raise TransformError(
                f"transform {name} turned a {tuple(x.shape)} uint8 image into {tuple(y.shape)} "
                f"{y.dtype}; TCAC transforms must keep the size and dtype"
            )
        return np.ascontiguousarray(y.permute(1, 2, 0).numpy())

    def __call__(self, image: np.ndarray, image_id: str) -> np.ndarray:
        """(S, S, 3) uint8 -> (T, S, S, 3) uint8, one version per transform in ``names`` order."""
        return np.stack([self.apply(image, image_id, name) for name in self.names])


class Transform:
    """Batch stage: ``pixels`` (n, S, S, 3) uint8 -> ``versions`` (n, 1 + T, S, S, 3) uint8.

    Version 0 is the decoded image, versions 1..T the transforms in config order. Rows
    already skipped keep zeros. ``pixels`` is dropped: version 0 is the same array.
    """

    needs = ("id", "pixels", "skip_stage")

    def __init__(self, transforms: Mapping[str, Mapping[str, Any]], seed: int) -> None:
        self.transforms = SeededTransforms(transforms, seed)

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        from clipscan.columns import require

        require(batch, self.needs, "transform")
        pixels = batch["pixels"]
        n = len(pixels)
        versions = np.zeros((n, 1 + len(self.transforms.names), *pixels.shape[1:]), dtype=np.uint8)
        for i in range(n):
            if batch["skip_stage"][i]:
                continue
            versions[i, 0] = pixels[i]
            versions[i, 1:] = self.transforms(pixels[i], str(batch["id"][i]))
        out = {k: v for k, v in batch.items() if k != "pixels"}
        out["versions"] = versions
        return out
