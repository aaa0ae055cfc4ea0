"""GPU paths: encoders in fp16 on CUDA and FAISS on GPU agree with the CPU paths. Skipped without a GPU."""

from __future__ import annotations

import numpy as np
import pytest

from tests.conftest import TINY_PROBE, TINY_REFERENCE, has_gpu

pytestmark = pytest.mark.skipif(not has_gpu(), reason="needs a CUDA GPU")


@pytest.mark.parametrize("spec", [TINY_PROBE, TINY_REFERENCE])
def test_fp16_on_gpu_matches_fp32_on_cpu(spec: str) -> None:
    from clipscan.models.registry import load_encoder

    images = np.random.default_rng(0).integers(0, 256, size=(16, 64, 64, 3), dtype=np.uint8)
    cpu = load_encoder(spec, "cpu", "fp32").embed_images(images)
    gpu = load_encoder(spec, "cuda", "fp16").embed_images(images)
    assert gpu.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(gpu, axis=1), 1.0, atol=1e-3)
    assert float(np.min(np.sum(cpu * gpu, axis=1))) > 0.99


def test_faiss_gpu_knn_matches_numpy() -> None:
    faiss = pytest.importorskip("faiss")
    if faiss.get_num_gpus() == 0:
        pytest.skip("this FAISS build sees no GPU (install faiss-gpu)")
    from clipscan.stages.index import self_knn

    x = np.random.default_rng(1).standard_normal((2000, 64)).astype(np.float32)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    sims, ids = self_knn(x, 10)
    brute = x @ x.T
    np.fill_diagonal(brute, -np.inf)
    want = np.argsort(-brute, axis=1, kind="stable")[:, :10]
    np.testing.assert_array_equal(ids, want)
