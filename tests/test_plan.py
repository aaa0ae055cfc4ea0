"""How the encoder pool is planned from the cluster, and the CPU paths of the GPU pieces (mixed precision, batched JPEG decode)."""

from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image

from clipscan.config import EmbedConfig
from clipscan.stages.decode import Decode
from clipscan.stages.rows import CPU_BATCH, GPU_BATCH, IO_CPUS, plan_resources
from tests import corpora
from tests.conftest import TINY_PROBE, TINY_REFERENCE


def test_cpu_node_decodes_in_the_actor_that_holds_its_cpus() -> None:
    plan = plan_resources({"CPU": 2.0}, EmbedConfig())
    assert (plan.actors, plan.decode, plan.num_gpus, plan.batch_size) == (1, "actor", 0.0, CPU_BATCH)
    assert plan.num_cpus == 2.0 - IO_CPUS and plan.threads == 2  # every core runs the encoders
    # one actor per CPU node, sized from the smallest node, never from the cluster total
    plan = plan_resources({"CPU": 12.0}, EmbedConfig(), node_cpus=[4.0, 8.0])
    assert plan.actors == 2 and plan.num_cpus == 4.0 - IO_CPUS and plan.threads == 4


def test_decode_tasks_leave_a_cpu_for_decoding() -> None:
    plan = plan_resources({"CPU": 2.0}, EmbedConfig(decode="tasks"))
    assert plan.decode == "tasks" and plan.num_cpus == 1.0 and plan.threads == 1
    assert plan_resources({"CPU": 2.0}, EmbedConfig(decode="tasks", cpus_per_actor=0.5, actors=2)).actors == 2


def test_gpu_batch_default_is_decided_where_defaults_are() -> None:
    gpu = plan_resources({"CPU": 16.0, "GPU": 4.0}, EmbedConfig())
    assert (gpu.actors, gpu.num_gpus, gpu.batch_size, gpu.decode) == (4, 1.0, GPU_BATCH, "tasks")
    # a batch size the user wrote is kept, even where it equals the CPU default
    assert plan_resources({"CPU": 16.0, "GPU": 4.0}, EmbedConfig(batch_size=64)).batch_size == 64
    assert plan_resources({"CPU": 16.0, "GPU": 1.0}, EmbedConfig(decode="gpu")).decode == "gpu"
    with pytest.raises(ValueError, match="embed.decode=gpu needs GPUs"):
        plan_resources({"CPU": 2.0}, EmbedConfig(decode="gpu"))


@pytest.mark.parametrize("spec", [TINY_PROBE, TINY_REFERENCE])
def test_bf16_autocast_keeps_fp32_weights_and_the_neighbours(spec: str) -> None:
    from clipscan.models.registry import load_encoder

    images = np.random.default_rng(0).integers(0, 256, size=(12, 48, 48, 3), dtype=np.uint8)
    fp32 = load_encoder(spec, "cpu", "fp32")
    bf16 = load_encoder(spec, "cpu", "bf16")
    assert all(p.dtype.is_floating_point and p.dtype.itemsize == 4 for p in bf16.module.parameters())
    a, b = fp32.embed_images(images), bf16.embed_images(images)
    assert b.dtype == np.float32 and np.allclose(np.linalg.norm(b, axis=1), 1.0, atol=1e-5)
    assert float(np.min(np.sum(a * b, axis=1))) > 0.98
    assert not np.array_equal(a, b)  # autocast really ran in bf16


def _png(colour: tuple[int, int, int]) -> bytes:
    out = io.BytesIO()
    Image.new("RGB", (40, 30), colour).save(out, "PNG")
    return out.getvalue()


def _cmyk_jpeg() -> bytes:
    out = io.BytesIO()
    Image.new("CMYK", (40, 40), (0, 255, 0, 0)).save(out, "JPEG")
    return out.getvalue()


def _smooth_jpeg(w: int, h: int) -> bytes:
    """A photo-like JPEG (gradients and a disc): resamplers agree on it, unlike on noise."""
    y, x = np.mgrid[0:h, 0:w]
    arr = np.stack([255 * x / w, 255 * y / h, 128 + 100 * ((x - w / 2) ** 2 + (y - h / 2) ** 2 < (h / 3) ** 2)], -1)
    out = io.BytesIO()
    Image.fromarray(arr.astype(np.uint8)).save(out, "JPEG", quality=92)
    return out.getvalue()


def _truncated(data: bytes) -> bytes:
    return data[: len(data) * 2 // 3]


def test_batched_jpeg_decode_with_cpu_fallback() -> None:
    """The nvJPEG path's logic, run with torchvision's CPU decoder: JPEGs batched, the rest on the CPU Decode."""
    from clipscan.stages.gpu_decode import GpuDecode, gpu_decodable

    blobs = [_smooth_jpeg(120, 90), _png((0, 200, 0)), b"", b"not an image", _cmyk_jpeg(),
             _truncated(corpora.jpeg(1, size=64)), _smooth_jpeg(70, 140)]
    n = len(blobs)
    batch = {
        "id": np.array([f"r{i}" for i in range(n)], dtype=object),
        "uri": np.array([""] * n, dtype=object),
        "image_bytes": np.array(blobs, dtype=object),
        "skip_stage": np.array([""] * n, dtype=object),
        "skip_reason": np.array([""] * n, dtype=object),
    }
    assert [gpu_decodable(b, 10**8) for b in blobs] == [True, False, False, False, False, True, True]
    stage = GpuDecode(32, 10**8, device="cpu")
    out = stage(dict(batch))
    cpu = Decode(32, 10**8)(dict(batch))
    assert list(out["skip_stage"]) == list(cpu["skip_stage"]) == ["", "", "decode", "decode", "", "decode", ""]
    assert list(out["skip_reason"]) == list(cpu["skip_reason"])  # the CPU decoder gave every reason
    assert stage.gpu_rows == 2  # two whole JPEGs decoded in the batch call; the truncated one fell back
    assert tuple(out["pixels"][1, 16, 16]) == (0, 200, 0) and out["notes"][4] == "CMYK->RGB"
    for i in (0, 6):  # the same picture as Pillow's, within resampling differences
        diff = np.abs(out["pixels"][i].astype(int) - cpu["pixels"][i].astype(int))
        assert diff.mean() < 4.0, (i, diff.mean())


def test_faiss_build_is_named_and_a_gpu_task_refuses_a_cpu_build() -> None:
    from clipscan.stages.index import FaissBuildError, faiss_facts, require_faiss_gpu

    facts = faiss_facts()
    assert facts["build"] in ("cpu", "gpu") and facts["version"] != "unknown"
    require_faiss_gpu(0)  # a CPU task searches with any build
    if facts["gpus"] == 0:
        with pytest.raises(FaissBuildError, match=r"holds 1 GPU\(s\) but its FAISS .* sees none: install clipscan\[gpu\]"):
            require_faiss_gpu(1)
