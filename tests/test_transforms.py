"""Tests for clipscan.stages.transforms: seeded, reproducible torchvision v2 transforms on uint8 images."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest

from clipscan.columns import MissingColumns
from clipscan.config import TcacSection
from clipscan.stages.transforms import (
    SeededTransforms,
    Transform,
    TransformError,
    build_transform,
    transform_seed,
)

PAPER = TcacSection().transforms  # the paper's seven, as the job config has them
RANDOM = ("rotation", "affine", "perspective", "elastic")


def image(seed: int = 0, size: int = 48) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return rng.integers(0, 256, size=(size, size, 3), dtype=np.uint8)


def test_seed_is_stable_and_separates_inputs() -> None:
    s = transform_seed("img-1", "rotation", 0)
    assert s == transform_seed("img-1", "rotation", 0) and 0 <= s < 2**63
    others = {transform_seed("img-2", "rotation", 0), transform_seed("img-1", "affine", 0),
              transform_seed("img-1", "rotation", 1)}
    assert s not in others and len(others) == 3
    # not Python's per-process string hash: another interpreter with another hash seed agrees
    code = "from clipscan.stages.transforms import transform_seed; print(transform_seed('img-1', 'rotation', 0))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         env={"PYTHONHASHSEED": "123", "PATH": ""})
    assert int(out.stdout) == s


def test_every_paper_transform_keeps_shape_and_is_reproducible() -> None:
    x = image()
    a, b = SeededTransforms(PAPER, seed=7), SeededTransforms(PAPER, seed=7)
    out = a(x, "scene-1")
    assert out.shape == (len(PAPER), 48, 48, 3) and out.dtype == np.uint8
    np.testing.assert_array_equal(out, b(x, "scene-1"))  # another instance (another worker)
    for t, name in enumerate(a.names):
        np.testing.assert_array_equal(out[t], a.apply(x, "scene-1", name))  # one at a time, same pixels
        assert not np.array_equal(out[t], x), name  # each one changes the image


def test_randomness_differs_across_ids_and_seeds() -> None:
    x = image()
    st = SeededTransforms(PAPER, seed=0)
    for name in RANDOM:
        one = st.apply(x, "scene-1", name)
        assert not np.array_equal(one, st.apply(x, "scene-2", name)), name
        assert not np.array_equal(one, SeededTransforms(PAPER, seed=1).apply(x, "scene-1", name)), name


def test_same_pixels_in_another_process() -> None:
    x = image(3)
    code = (
        "import sys, numpy as np\n"
        "from clipscan.stages.transforms import SeededTransforms\n"
        "x = np.random.default_rng(3).integers(0, 256, size=(48, 48, 3), dtype=np.uint8)\n"
        f"out = SeededTransforms({PAPER!r}, seed=5)(x, 'scene-9')\n"
        "sys.stdout.buffer.write(out.tobytes())\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, check=True)
    here = SeededTransforms(PAPER, seed=5)(x, "scene-9")
    np.testing.assert_array_equal(np.frombuffer(out.stdout, np.uint8).reshape(here.shape), here)


def test_identity_flip_invert_grayscale() -> None:
    x = image(1)
    st = SeededTransforms({"rot0": {"op": "rotation", "degrees": 0}, "hflip": {}, "invert": {},
                           "grayscale": {}}, seed=0)
    np.testing.assert_array_equal(st.apply(x, "a", "rot0"), x)
    flipped = st.apply(x, "a", "hflip")
    np.testing.assert_array_equal(flipped, x[:, ::-1])
    np.testing.assert_array_equal(st.apply(flipped, "a", "hflip"), x)  # twice = the original
    np.testing.assert_array_equal(st.apply(x, "a", "invert"), 255 - x)
    gray = st.apply(x, "a", "grayscale")
    assert (gray[..., 0] == gray[..., 1]).all() and (gray[..., 1] == gray[..., 2]).all()


def test_global_torch_rng_untouched() -> None:
    import torch

    torch.manual_seed(42)
    want = torch.rand(3)
    torch.manual_seed(42)
    SeededTransforms(PAPER, seed=0)(image(), "x")
    assert torch.equal(torch.rand(3), want)


def test_separable_elastic_matches_torchvision_field() -> None:
    import torch
    from torchvision.transforms import v2

    x = torch.zeros(3, 64, 64, dtype=torch.uint8)
    ours, theirs = build_transform("elastic", {"alpha": 50.0, "sigma": 5.0}), v2.ElasticTransform(50.0, 5.0)
    torch.manual_seed(3)
    a = ours.make_params([x])["displacement"]
    torch.manual_seed(3)
    b = theirs.make_params([x])["displacement"]
    assert a.shape == b.shape == (1, 64, 64, 2)
    torch.testing.assert_close(a, b, atol=1e-6, rtol=0)


def test_bad_transform_configs_name_the_entry() -> None:
    with pytest.raises(TransformError, match=r"tcac.transforms.blur: unknown transform 'blur'"):
        SeededTransforms({"blur": {}}, 0)
    with pytest.raises(TransformError, match=r"tcac.transforms.rotation: RandomRotation"):
        SeededTransforms({"rotation": {"degree": 5}}, 0)
    with pytest.raises(TransformError, match="is empty"):
        SeededTransforms({}, 0)
    st = SeededTransforms({"small": {"op": "Resize", "size": [8, 8]}}, 0)  # any v2 class works
    with pytest.raises(TransformError, match="must keep the size"):
        st.apply(image(), "a", "small")


def test_transform_stage_batch() -> None:
    pixels = np.stack([image(i) for i in range(3)])
    batch = {
        "id": np.array(["a", "b", "c"], dtype=object),
        "skip_stage": np.array(["", "decode", ""], dtype=object),
        "pixels": pixels,
    }
    stage = Transform({"hflip": {}, "rotation": {"degrees": 20}}, seed=0)
    out = stage(batch)
    assert "pixels" not in out and out["versions"].shape == (3, 3, 48, 48, 3)
    np.testing.assert_array_equal(out["versions"][:, 0][[0, 2]], pixels[[0, 2]])
    assert not out["versions"][1].any()  # a skipped row stays zeros
    np.testing.assert_array_equal(out["versions"][2, 2], stage.transforms.apply(pixels[2], "c", "rotation"))
    with pytest.raises(MissingColumns, match="stage 'transform' needs columns \\['pixels'\\]"):
        stage({"id": batch["id"], "skip_stage": batch["skip_stage"]})


def test_tcac_modules_import_light() -> None:
    code = (
        "import sys, clipscan.stages.transforms, clipscan.stages.tcac.pool, clipscan.stages.tcac.score, clipscan.stages.tcac.collect, clipscan.stages.tcac.figures, clipscan.stages.tcac.repeats, clipscan.stages.text, clipscan.report.tcac\n"
        "print(','.join(m for m in ('torch', 'torchvision', 'faiss', 'ray', 'open_clip') if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "", f"TCAC modules pulled in: {out.stdout.strip()}"


def test_rotation_and_affine_add_no_edges() -> None:
    """Reflect-padded, bilinear: a flat image stays flat; torchvision's constant fill adds black corners."""
    flat = np.full((48, 48, 3), 128, dtype=np.uint8)
    st = SeededTransforms({"rotation": {"degrees": [30, 30]}, "affine": {"degrees": 15, "translate": [0.1, 0.1],
                           "scale": [0.9, 1.1], "shear": 10},
                           "black": {"op": "rotation", "degrees": [30, 30], "edges": "fill"}}, seed=0)
    assert (st.apply(flat, "a", "rotation") == 128).all() and (st.apply(flat, "a", "affine") == 128).all()
    assert (st.apply(flat, "a", "black") == 0).any()
    # bilinear: rotating a sharp step gives in-between values along it; nearest would not
    step = np.zeros((48, 48, 3), dtype=np.uint8)
    step[:, 24:] = 200
    values = set(np.unique(st.apply(step, "a", "rotation")).tolist())
    assert len(values - {0, 200}) > 0
    with pytest.raises(TransformError, match="edges must be one of"):
        SeededTransforms({"rotation": {"edges": "wrap"}}, 0)
    with pytest.raises(TransformError, match="applies to"):
        SeededTransforms({"hflip": {"edges": "reflect"}}, 0)
