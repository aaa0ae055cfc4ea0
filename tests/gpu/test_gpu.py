"""GPU paths agree with the CPU paths: mixed precision keeps the neighbours, nvJPEG matches Pillow, FAISS on GPU matches numpy. Skipped without a GPU."""

from __future__ import annotations

import numpy as np
import pytest

from tests.conftest import TINY_PROBE, TINY_REFERENCE, has_gpu

pytestmark = pytest.mark.skipif(not has_gpu(), reason="needs a CUDA GPU")


def _scenes(n: int, size: int) -> np.ndarray:
    from clipscan.data.scenes import make_scene, render

    return np.stack([np.asarray(render(make_scene(7, i), size)) for i in range(n)])


def _top10(x: np.ndarray) -> np.ndarray:
    sims = x @ x.T
    np.fill_diagonal(sims, -np.inf)
    return np.argsort(-sims, axis=1, kind="stable")[:, :10]


@pytest.mark.parametrize("precision", ["fp16", "bf16"])
@pytest.mark.parametrize("spec", ["open_clip:ViT-B-32", TINY_PROBE, TINY_REFERENCE])
def test_mixed_precision_keeps_the_fp32_neighbours(spec: str, precision: str) -> None:
    from clipscan.models.registry import load_encoder

    images = _scenes(200, 96)
    fp32 = load_encoder(spec, "cuda", "fp32").embed_images(images)
    half = load_encoder(spec, "cuda", precision).embed_images(images)
    assert half.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(half, axis=1), 1.0, atol=1e-3)
    a, b = _top10(fp32), _top10(half)
    overlap = np.mean([len(set(a[i]) & set(b[i])) / 10 for i in range(len(a))])
    assert overlap >= 0.95, f"{spec} {precision}: overlap@10 with the fp32 lists is {overlap:.3f}"
    cpu = load_encoder(spec, "cpu", "fp32").embed_images(images)
    assert float(np.min(np.sum(cpu * fp32, axis=1))) > 0.999  # the GPU fp32 path is the CPU's


def test_nvjpeg_decode_matches_pillow() -> None:
    import io

    from PIL import Image

    from clipscan.stages.decode import Decode
    from clipscan.stages.gpu_decode import GpuDecode

    images = _scenes(32, 160)
    blobs = []
    for arr in images:
        buf = io.BytesIO()
        Image.fromarray(arr).save(buf, "JPEG", quality=92)
        blobs.append(buf.getvalue())
    blobs += [b"", b"\xff\xd8\xff broken"]
    n = len(blobs)
    batch = {"id": np.array([str(i) for i in range(n)], dtype=object), "uri": np.array([""] * n, dtype=object),
             "image_bytes": np.array(blobs, dtype=object), "skip_stage": np.array([""] * n, dtype=object),
             "skip_reason": np.array([""] * n, dtype=object)}
    stage = GpuDecode(96, 10**8, device="cuda")
    gpu, cpu = stage(dict(batch)), Decode(96, 10**8)(dict(batch))
    assert stage.gpu_rows == 32
    assert list(gpu["skip_reason"]) == list(cpu["skip_reason"])
    diff = np.abs(gpu["pixels"][:32].astype(int) - cpu["pixels"][:32].astype(int))
    assert diff.mean() < 3.0, diff.mean()


def test_faiss_gpu_knn_matches_numpy() -> None:
    faiss = pytest.importorskip("faiss")
    if faiss.get_num_gpus() == 0:
        pytest.skip("this FAISS build sees no GPU (install clipscan[gpu])")
    from clipscan.stages.index import self_knn

    x = np.random.default_rng(1).standard_normal((2000, 64)).astype(np.float32)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    sims, ids = self_knn(x, 10)
    brute = x @ x.T
    np.fill_diagonal(brute, -np.inf)
    want = np.argsort(-brute, axis=1, kind="stable")[:, :10]
    np.testing.assert_array_equal(ids, want)


def test_ivf_shard_searches_on_the_gpu_as_on_the_cpu() -> None:
    """A shard that holds a GPU searches a clone of its IVF index there: the same lists as
    the CPU index (within float rounding), and its list count and training sample scale
    with its rows."""
    import pyarrow as pa

    from clipscan.arrays import embedding_array
    from clipscan.stages import index as ix
    from clipscan.stages import search as sr

    rng = np.random.default_rng(0)
    n = 40_000
    centres = rng.normal(size=(200, 32))
    x = centres[rng.integers(0, 200, n)] + 0.3 * rng.normal(size=(n, 32))
    x = (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)
    table = pa.table({"id": [f"i{j:06d}" for j in range(n)], "probe": embedding_array(x), "reference": embedding_array(x)})
    cpu = sr.Shard.from_table(table, 0, index="IVF,Flat", nprobe=16, train_sample=1000)
    gpu = sr.Shard.from_table(table, 0, index="IVF,Flat", nprobe=16, train_sample=1000, gpu=True)
    assert set(gpu.gpu) >= {"probe", "reference"} and not cpu.gpu
    assert ix._ivf_or_none(cpu.approx["probe"]).nlist == 800  # 4 sqrt(n), trained on 39 rows a list, not 1000
    q = x[:500]
    a = cpu.search(np.array(table.column("id").to_pylist()[:500], dtype=object), {"probe": q, "reference": q},
                   {"probe": 11, "reference": 11}, 0)
    b = gpu.search(np.array(table.column("id").to_pylist()[:500], dtype=object), {"probe": q, "reference": q},
                   {"probe": 11, "reference": 11}, 0)
    overlap, _ = ix.neighbour_overlap(a["probe"]["ids"], b["probe"]["ids"])
    assert float(np.mean(overlap)) > 0.99
    np.testing.assert_allclose(a["probe"]["sims"], b["probe"]["sims"], atol=1e-4)
