"""Model spec strings in, ``Encoder`` objects out: uint8 image batches -> L2-normalised embeddings.

Specs:
  ``open_clip:NAME@PRETRAINED``        open_clip model name and pretrained tag (or weights file)
  ``open_clip:PATH/config.json[@W]``   an open_clip config file, optional local weights
  ``open_clip:tiny-clip``              a config shipped in ``clipscan/models/configs``
  ``hf:ID_OR_DIR``                     Hugging Face CLIP, SigLIP or DINOv2 (hub id or local dir)
  ``hf:tiny-dinov2``                   a config shipped in ``clipscan/models/configs``
  ``py:module:factory``                ``factory()`` returns an object with ``embed_images``
                                       (list[PIL.Image] -> (n, d)) and optionally ``embed_texts``
  ``emb:PATH``                         precomputed embeddings (clip-retrieval's ``img_emb/`` +
                                       ``metadata/`` layout, or Parquet with ``id``, ``embedding``);
                                       no encoder: ``clipscan.data.precomputed`` reads them
"""

from __future__ import annotations

import importlib
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

CONFIG_DIR = Path(__file__).parent / "configs"
OFFLINE_HINT = "no network? run the offline config: python jobs/daf.py --config configs/daf-tiny.yaml"

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


class ModelLoadError(RuntimeError):
    """A model spec that cannot be loaded; the message names the spec and the reason."""


@dataclass(frozen=True)
class ModelSpec:
    kind: str  # open_clip | hf | py | emb
    name: str  # model name, config path, hub id / dir, module:factory, or the embeddings' path
    weights: str | None = None  # pretrained tag or weights path (open_clip only)

    def __str__(self) -> str:
        return f"{self.kind}:{self.name}" + (f"@{self.weights}" if self.weights else "")


def parse_spec(spec: str) -> ModelSpec:
    """``"open_clip:ViT-B-32@laion2b_s34b_b79k"`` -> ``ModelSpec("open_clip", "ViT-B-32", "laion2b_s34b_b79k")``."""
    kind, sep, rest = spec.partition(":")
    if not sep or not rest or kind not in ("open_clip", "hf", "py", "emb"):
        raise ModelLoadError(
            f"model spec {spec!r} is not one of open_clip:NAME@PRETRAINED, "
            "open_clip:CONFIG.json[@WEIGHTS], hf:ID_OR_DIR, py:module:factory, emb:PATH"
        )
    if kind == "emb":
        return ModelSpec(kind, rest)  # a path or URI; "@" and ":" are part of it
    if kind == "open_clip" and "@" in rest:
        name, weights = rest.split("@", 1)
        return ModelSpec(kind, name, weights or None)
    if kind == "py" and ":" not in rest:
        raise ModelLoadError(f"model spec {spec!r}: py: needs module:factory")
    return ModelSpec(kind, rest)


def is_precomputed(spec: str | None) -> bool:
    """True for an ``emb:PATH`` spec: embeddings read from PATH, no encoder to load or run."""
    return spec is not None and spec.startswith("emb:") and len(spec) > len("emb:")


def shipped_config(name: str) -> Path | None:
    """The JSON config shipped under ``clipscan/models/configs`` with this stem, if any."""
    path = CONFIG_DIR / f"{name}.json"
    return path if path.is_file() else None


class Encoder:
    """One embedding model behind a uniform interface.

    ``embed_images`` takes (n, H, W, 3) uint8 RGB and returns (n, d) float32, L2-normalised.
    ``embed_texts`` (where the model has a text tower) takes n strings, returns the same.
    """

    spec: str
    image_size: int
    has_text: bool = False
    logit_scale: float = 100.0

    def embed_images(self, images: np.ndarray) -> np.ndarray:
        raise NotImplementedError

    def embed_texts(self, texts: list[str]) -> np.ndarray:
        raise ModelLoadError(f"model {self.spec} has no text encoder")


def _l2(x: np.ndarray) -> np.ndarray:
    x = np.asarray(x, dtype=np.float32)
    norm = np.linalg.norm(x, axis=1, keepdims=True)
    return x / np.maximum(norm, 1e-12)


class TorchEncoder(Encoder):
    """Shared torch path: uint8 batch -> device -> resize -> normalise -> model -> L2 on device."""

    def __init__(
        self,
        spec: str,
        image_fn: Any,
        text_fn: Any | None,
        module: Any,
        image_size: int,
        mean: tuple[float, ...],
        std: tuple[float, ...],
        logit_scale: float = 100.0,
        device: str = "cpu",
        precision: str = "auto",
    ) -> None:
        import torch

        self.spec = spec
        self.image_size = int(image_size)
        self.has_text = text_fn is not None
        self.logit_scale = float(logit_scale)
        self.device = torch.device(device)
        if precision == "auto":
            precision = "fp16" if self.device.type == "cuda" else "fp32"
        self.dtype = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}[precision]
        # Weights stay fp32 and fp16/bf16 run under autocast, the libraries' own mixed precision:
        # layer norms, softmax and the final projection keep fp32 where autocast says so.
        self.module = module.to(self.device).eval()
        self._image_fn = image_fn
        self._text_fn = text_fn
        self._mean = torch.tensor(mean, device=self.device, dtype=torch.float32).view(1, 3, 1, 1)
        self._std = torch.tensor(std, device=self.device, dtype=torch.float32).view(1, 3, 1, 1)

    def _pixels(self, images: np.ndarray) -> Any:
        import torch
        import torch.nn.functional as F

        if images.ndim != 4 or images.shape[-1] != 3 or images.dtype != np.uint8:
            raise ValueError(
                f"{self.spec}: expected (n, H, W, 3) uint8 images, got {images.shape} {images.dtype}"
            )
        x = torch.from_numpy(np.ascontiguousarray(images)).to(self.device, non_blocking=True)
        x = x.permute(0, 3, 1, 2).float().div_(255.0)
        if x.shape[-1] != self.image_size or x.shape[-2] != self.image_size:
            x = F.interpolate(
                x, size=(self.image_size, self.image_size), mode="bicubic", antialias=True,
                align_corners=False,
            ).clamp_(0.0, 1.0)
        return (x - self._mean) / self._std

    def _autocast(self) -> Any:
        import contextlib

        import torch

        if self.dtype == torch.float32:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.dtype)

    def embed_images(self, images: np.ndarray) -> np.ndarray:
        import torch

        with torch.inference_mode():
            with self._autocast():
                out = self._image_fn(self._pixels(images))
            out = torch.nn.functional.normalize(out.float(), dim=-1)
        return out.cpu().numpy().astype(np.float32, copy=False)

    def embed_texts(self, texts: list[str]) -> np.ndarray:
        import torch

        if self._text_fn is None:
            return super().embed_texts(texts)
        with torch.inference_mode():
            with self._autocast():
                out = self._text_fn(list(texts))
            out = torch.nn.functional.normalize(out.float(), dim=-1)
        return out.cpu().numpy().astype(np.float32, copy=False)


def _hub_error(spec: str, e: BaseException) -> ModelLoadError:
    chain: list[str] = []
    cur: BaseException | None = e
    while cur is not None and len(chain) < 6:
        chain.append(f"{type(cur).__name__}: {cur}")
        cur = cur.__cause__ or cur.__context__
    text = " ".join(chain)
    offline_words = ("LocalEntryNotFound", "Connection", "offline", "Offline", "resolve", "Timeout",
                     "Max retries", "Network", "HTTPError", "not found in cache", "outgoing traffic")
    if any(w in text for w in offline_words):
        return ModelLoadError(
            f"cannot load {spec}: its weights are not in the local cache and the hub cannot be "
            f"reached ({type(e).__name__}); {OFFLINE_HINT}"
        )
    return ModelLoadError(f"cannot load {spec}: {type(e).__name__}: {e}")


def _load_open_clip(spec: ModelSpec, device: str, precision: str) -> Encoder:
    import open_clip

    name, weights = spec.name, spec.weights
    config_file = Path(name) if name.endswith(".json") else shipped_config(name)
    if config_file is not None:
        if not config_file.is_file():
            raise ModelLoadError(f"{spec}: open_clip config file {config_file} does not exist")
        open_clip.add_model_config(str(config_file))
        name = config_file.stem
    elif name not in open_clip.list_models():
        raise ModelLoadError(f"{spec}: {name!r} is not an open_clip model name or a config file")
    weights_path = weights if weights and (os.sep in weights or os.path.exists(weights)) else None
    try:
        model = open_clip.create_model(
            name,
            pretrained=None if weights_path else weights,
            load_weights=weights is not None and weights_path is None,
            weights_only=True,
        )
    except Exception as e:  # hub, cache and config errors all surface here
        raise _hub_error(str(spec), e) from e
    if weights_path is not None:
        if not os.path.isfile(weights_path):
            raise ModelLoadError(f"{spec}: weights file {weights_path} does not exist")
        try:
            open_clip.load_checkpoint(model, weights_path, weights_only=True)
        except Exception as e:
            raise ModelLoadError(f"{spec}: cannot load weights {weights_path}: {e}") from e
    tokenizer = open_clip.get_tokenizer(name)
    cfg = open_clip.get_model_preprocess_cfg(model)
    size = cfg.get("size", 224)
    size = size[0] if isinstance(size, (tuple, list)) else size
    logit_scale = float(model.logit_scale.exp().item()) if hasattr(model, "logit_scale") else 100.0
    enc: TorchEncoder | None = None

    def text_fn(texts: list[str]) -> Any:
        assert enc is not None
        return model.encode_text(tokenizer(texts).to(enc.device))

    enc = TorchEncoder(
        str(spec), model.encode_image, text_fn, model, size,
        tuple(cfg.get("mean", CLIP_MEAN)), tuple(cfg.get("std", CLIP_STD)),
        logit_scale, device, precision,
    )
    return enc


def _pooled(out: Any) -> Any:
    return out if hasattr(out, "shape") else out.pooler_output


def _load_hf(spec: ModelSpec, device: str, precision: str) -> Encoder:
    import transformers

    shipped = shipped_config(spec.name)
    processor_cfg: dict[str, Any] = {}
    if shipped is not None:
        kwargs = json.loads(shipped.read_text())
        model_type = kwargs.pop("model_type")
        config = transformers.AutoConfig.for_model(model_type, **kwargs)
        model = transformers.AutoModel.from_config(config)
        source = None
    else:
        source = spec.name
        if source.startswith((".", "/")) and not os.path.isdir(source):
            raise ModelLoadError(f"{spec}: directory {source} does not exist")
        try:
            config = transformers.AutoConfig.from_pretrained(source)
            model = transformers.AutoModel.from_pretrained(source)
        except Exception as e:
            raise _hub_error(str(spec), e) from e
        try:
            proc = transformers.AutoImageProcessor.from_pretrained(source)
            processor_cfg = proc.to_dict()
        except Exception:  # a model saved without its processor: use the family's defaults
            processor_cfg = {}
    model_type = config.model_type
    tokenizer = None
    if model_type in ("clip", "siglip", "siglip2"):
        vision_cfg = config.vision_config
        mean, std = (CLIP_MEAN, CLIP_STD) if model_type == "clip" else ((0.5,) * 3, (0.5,) * 3)
        if source is not None:
            try:
                tokenizer = transformers.AutoTokenizer.from_pretrained(source)
            except Exception:
                tokenizer = None
        image_fn = lambda px: _pooled(model.get_image_features(pixel_values=px))  # noqa: E731
        logit_scale = float(model.logit_scale.exp().item())
    elif model_type == "dinov2":
        vision_cfg = config
        mean, std = IMAGENET_MEAN, IMAGENET_STD
        image_fn = lambda px: model(pixel_values=px).pooler_output  # noqa: E731  CLS token after layernorm
        logit_scale = 100.0
    else:
        raise ModelLoadError(f"{spec}: model type {model_type!r} is not one of clip, siglip, dinov2")
    mean = tuple(processor_cfg.get("image_mean", mean))
    std = tuple(processor_cfg.get("image_std", std))
    crop = processor_cfg.get("crop_size") or processor_cfg.get("size") or {}
    size = crop.get("height", crop.get("shortest_edge", vision_cfg.image_size)) if isinstance(crop, dict) else crop
    enc: TorchEncoder | None = None

    def text_fn(texts: list[str]) -> Any:
        assert enc is not None and tokenizer is not None
        # fixed-length padding: a caption's embedding must not depend on the others in its batch
        tok = tokenizer(texts, padding="max_length", truncation=True, return_tensors="pt").to(enc.device)
        return _pooled(model.get_text_features(**tok))

    enc = TorchEncoder(
        str(spec), image_fn, text_fn if tokenizer is not None else None, model, int(size),
        mean, std, logit_scale, device, precision,
    )
    return enc


class PyEncoder(Encoder):
    """A user's own model: ``factory()`` -> object with ``embed_images(list[PIL.Image])``."""

    def __init__(self, spec: ModelSpec) -> None:
        module_name, _, factory_name = spec.name.partition(":")
        try:
            module = importlib.import_module(module_name)
        except ImportError as e:
            raise ModelLoadError(f"{spec}: cannot import module {module_name!r}: {e}") from e
        factory = getattr(module, factory_name, None)
        if not callable(factory):
            raise ModelLoadError(f"{spec}: module {module_name!r} has no callable {factory_name!r}")
        self.model = factory()
        if not callable(getattr(self.model, "embed_images", None)):
            raise ModelLoadError(f"{spec}: the object {factory_name}() returns has no embed_images")
        self.spec = str(spec)
        self.image_size = int(getattr(self.model, "image_size", 0) or 0)
        self.has_text = callable(getattr(self.model, "embed_texts", None))
        self.logit_scale = float(getattr(self.model, "logit_scale", 100.0))

    def embed_images(self, images: np.ndarray) -> np.ndarray:
        from PIL import Image

        pil = [Image.fromarray(img) for img in images]
        if self.image_size:
            pil = [p.resize((self.image_size, self.image_size), Image.Resampling.BICUBIC) for p in pil]
        out = np.asarray(self.model.embed_images(pil))
        if out.ndim != 2 or out.shape[0] != len(pil):
            raise ValueError(f"{self.spec}: embed_images returned shape {out.shape} for {len(pil)} images")
        return _l2(out)

    def embed_texts(self, texts: list[str]) -> np.ndarray:
        if not self.has_text:
            return super().embed_texts(texts)
        return _l2(np.asarray(self.model.embed_texts(list(texts))))


def load_encoder(spec: str, device: str = "cpu", precision: str = "auto") -> Encoder:
    """Load the encoder a spec string names, on ``device`` (``cpu`` / ``cuda``) at ``precision``.

    Models built without weights (the tiny test configs) are initialised from a fixed
    seed, so every actor of a job, and every run, holds the same random weights.
    """
    parsed = parse_spec(spec)
    if parsed.kind == "emb":
        raise ModelLoadError(f"model spec {spec!r}: emb: names precomputed embeddings; there is no encoder "
                             "to load (images and texts cannot be embedded with it)")
    if parsed.kind == "py":
        return PyEncoder(parsed)
    import torch

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        if parsed.kind == "open_clip":
            return _load_open_clip(parsed, device, precision)
        return _load_hf(parsed, device, precision)
