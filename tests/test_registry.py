import json
import sys
from pathlib import Path

import numpy as np
import pytest

from clipscan.models.registry import ModelLoadError, load_encoder, parse_spec, shipped_config

IMAGES = np.random.default_rng(0).integers(0, 256, size=(4, 48, 48, 3), dtype=np.uint8)


def test_parse_spec() -> None:
    s = parse_spec("open_clip:ViT-B-32@laion2b_s34b_b79k")
    assert (s.kind, s.name, s.weights) == ("open_clip", "ViT-B-32", "laion2b_s34b_b79k")
    assert parse_spec("hf:facebook/dinov2-small").name == "facebook/dinov2-small"
    assert parse_spec("py:pkg.mod:make").name == "pkg.mod:make"
    for bad in ("clip", "torch:x", "py:nofactory", "hf:"):
        with pytest.raises(ModelLoadError, match="spec"):
            parse_spec(bad)


@pytest.mark.parametrize("spec", ["open_clip:tiny-clip", "hf:tiny-dinov2"])
def test_tiny_models_embed_normalised(spec: str) -> None:
    enc = load_encoder(spec)
    out = enc.embed_images(IMAGES)
    assert out.dtype == np.float32 and out.shape[0] == 4
    np.testing.assert_allclose(np.linalg.norm(out, axis=1), 1.0, atol=1e-5)


def test_open_clip_checkpoint_roundtrip(tmp_path: Path) -> None:
    import open_clip
    import torch

    config = tmp_path / "my-tiny.json"
    config.write_text(shipped_config("tiny-clip").read_text())  # type: ignore[union-attr]
    open_clip.add_model_config(str(config))
    model = open_clip.create_model("my-tiny", pretrained=None)
    torch.save(model.state_dict(), tmp_path / "weights.pt")
    enc = load_encoder(f"open_clip:{config}@{tmp_path / 'weights.pt'}")
    with torch.no_grad():
        ref = load_encoder(f"open_clip:{config}")  # random init: different weights
    assert not np.allclose(enc.embed_images(IMAGES), ref.embed_images(IMAGES))
    # the loaded weights are exactly the saved ones
    loaded = dict(enc.module.state_dict())  # type: ignore[attr-defined]
    for key, value in model.state_dict().items():
        torch.testing.assert_close(loaded[key], value)
    texts = enc.embed_texts(["a red circle", "a blue square on a grey background"])
    assert texts.shape == (2, 32)


def test_dinov2_save_pretrained_roundtrip(tmp_path: Path) -> None:
    import torch
    import transformers

    kwargs = json.loads(shipped_config("tiny-dinov2").read_text())  # type: ignore[union-attr]
    kwargs.pop("model_type")
    model = transformers.Dinov2Model(transformers.Dinov2Config(**kwargs)).eval()
    model.save_pretrained(tmp_path / "dino")
    enc = load_encoder(f"hf:{tmp_path / 'dino'}")
    assert enc.image_size == 28 and not enc.has_text
    pixels = enc._pixels(IMAGES)  # type: ignore[attr-defined]
    with torch.no_grad():
        want = torch.nn.functional.normalize(model(pixel_values=pixels).pooler_output, dim=-1).numpy()
    np.testing.assert_allclose(enc.embed_images(IMAGES), want, atol=1e-5)


def test_hf_clip_dir_has_text_tower(tmp_path: Path) -> None:
    import transformers

    cfg = transformers.CLIPConfig(
        text_config={"vocab_size": 99, "hidden_size": 16, "intermediate_size": 32, "num_hidden_layers": 1,
                     "num_attention_heads": 2, "max_position_embeddings": 16},
        vision_config={"hidden_size": 16, "intermediate_size": 32, "num_hidden_layers": 1,
                       "num_attention_heads": 2, "image_size": 32, "patch_size": 8},
        projection_dim=8,
    )
    transformers.CLIPModel(cfg).save_pretrained(tmp_path / "clip")
    enc = load_encoder(f"hf:{tmp_path / 'clip'}")
    assert enc.image_size == 32
    assert enc.embed_images(IMAGES).shape == (4, 8)


def test_py_factory(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "mymodel.py").write_text(
        "import numpy as np\n"
        "class M:\n"
        "    image_size = 16\n"
        "    def embed_images(self, images):\n"
        "        return np.stack([np.asarray(i, dtype=np.float32).mean(axis=(0, 1)) for i in images])\n"
        "    def embed_texts(self, texts):\n"
        "        return np.ones((len(texts), 3))\n"
        "def make():\n"
        "    return M()\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    enc = load_encoder("py:mymodel:make")
    out = enc.embed_images(IMAGES)
    assert out.shape == (4, 3) and enc.has_text
    np.testing.assert_allclose(np.linalg.norm(out, axis=1), 1.0, atol=1e-6)
    with pytest.raises(ModelLoadError, match="no callable 'nope'"):
        load_encoder("py:mymodel:nope")
    sys.modules.pop("mymodel", None)


def test_missing_files_and_offline_hub_say_so(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ModelLoadError, match="does not exist"):
        load_encoder(f"open_clip:{tmp_path}/none.json")
    with pytest.raises(ModelLoadError, match="not an open_clip model name"):
        load_encoder("open_clip:No-Such-Model")
    with pytest.raises(ModelLoadError) as e:
        load_encoder("hf:facebook/dinov2-small")
    assert "not in the local cache" in str(e.value) and "configs/daf-tiny.yaml" in str(e.value)
    assert "\n" not in str(e.value)
