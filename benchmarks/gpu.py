"""GPU check: images/s per GPU for decode, encoders and both together, and exact top-10 over 1M x 512.

Needs only torch, torchvision, transformers, pyarrow, pillow and open_clip_torch, so it
runs on a bare CUDA machine with PyTorch (no Ray, FAISS or vLLM) in a few minutes on one
GPU. Random weights; photo-like JPEGs generated from the test scenes with sensor-like
noise (384 px, tens of KB each; --jpeg-size changes it). Prints one table per part and
a JSON line with every figure.

  1. decode alone: nvJPEG batched (torchvision.io.decode_jpeg on cuda) + resize/crop on
     the GPU, against PIL on one CPU core;
  2. encoders alone on pre-decoded uint8 batches: ViT-B-32 (open_clip) and a
     DINOv2-S/14-sized model (transformers), fp16 and bf16 autocast, batch sweep;
  3. decode plus both encoders in one process (clipscan's GpuDecode + both encoders, the
     path of `embed.decode: gpu`), bf16 or fp16, at the best batch of part 2;
  4. exact top-10 over 1,000,000 x 512 fp16 with torch matmul + topk, in query blocks.

    python benchmarks/gpu.py [--images 2048] [--quick]

The goal for part 3 is 4,000 images/s per H100-class GPU.
"""

from __future__ import annotations

import argparse
import io
import json
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import dinov2_small_dir  # noqa: E402


def jpegs(n: int, size: int) -> list[bytes]:
    """n distinct photo-like JPEGs at size x size: generated scenes with sensor-like noise, quality 90."""
    from PIL import Image

    from clipscan.data.scenes import make_scene, render

    rng = np.random.default_rng(0)
    base = [np.asarray(render(make_scene(0, i), size), dtype=np.int16) for i in range(min(n, 64))]
    out = []
    for i in range(n):
        noisy = base[i % len(base)] + rng.normal(0, 10, size=(size, size, 3)).astype(np.int16)
        buf = io.BytesIO()
        Image.fromarray(np.clip(noisy, 0, 255).astype(np.uint8)).save(buf, "JPEG", quality=90)
        out.append(buf.getvalue())
    return out


DEVICE = "cuda"  # --device cpu: a smoke run of this script where there is no GPU (figures meaningless)


def sync() -> None:
    import torch

    if DEVICE == "cuda":
        torch.cuda.synchronize()


def timed(fn, repeats: int = 3) -> float:  # type: ignore[no-untyped-def]
    """Best wall seconds of ``fn()`` over ``repeats`` runs, device synchronised."""
    best = float("inf")
    for _ in range(repeats):
        sync()
        start = time.perf_counter()
        fn()
        sync()
        best = min(best, time.perf_counter() - start)
    return best


def decode_rates(blobs: list[bytes], size: int, batch: int) -> dict[str, float]:
    from clipscan.stages.decode import decode_image
    from clipscan.stages.gpu_decode import GpuDecode

    stage = GpuDecode(size, 10**9, device=DEVICE)

    def gpu() -> None:
        for lo in range(0, len(blobs), batch):
            for image in stage.decode_jpegs(blobs[lo : lo + batch]):
                _ = image  # resize/crop is part of the decode path below

    def gpu_full() -> None:
        from clipscan.stages.gpu_decode import resize_crop

        for lo in range(0, len(blobs), batch):
            for image in stage.decode_jpegs(blobs[lo : lo + batch]):
                resize_crop(image, size)

    cpu_n = min(len(blobs), 512)
    start = time.perf_counter()
    for b in blobs[:cpu_n]:
        decode_image(b, size, 10**9)
    cpu = cpu_n / (time.perf_counter() - start)
    gpu()  # warm-up (nvJPEG handles, CUDA context)
    return {"nvjpeg_decode": len(blobs) / timed(gpu), "nvjpeg_decode_resize": len(blobs) / timed(gpu_full),
            "pil_one_core": cpu}


def load_models(root: Path) -> dict[str, str]:
    return {"ViT-B-32": "open_clip:ViT-B-32", "DINOv2-S/14": dinov2_small_dir(root, image_size=224)}


def encoder_rates(models: dict[str, str], pixels: np.ndarray, batches: list[int], images: int) -> dict[str, dict[str, float]]:
    """Images/s of each encoder and of both, per precision and batch size, over about ``images`` images each."""
    from clipscan.models.registry import load_encoder

    out: dict[str, dict[str, float]] = {}
    for precision in ("fp16", "bf16"):
        encoders = {name: load_encoder(spec, DEVICE, precision) for name, spec in models.items()}
        for batch in batches:
            x = pixels[:batch]
            reps = max(1, images // batch)
            for name, enc in [*encoders.items(), ("both", None)]:
                chosen = list(encoders.values()) if enc is None else [enc]

                def run(chosen: list = chosen, x: np.ndarray = x, reps: int = reps) -> None:  # type: ignore[type-arg]
                    for _ in range(reps):
                        for e in chosen:
                            e.embed_images(x)

                run()  # warm-up at this shape
                out.setdefault(f"{name} {precision}", {})[str(batch)] = batch * reps / timed(run, 2)
        del encoders
    return out


def pipeline_rate(models: dict[str, str], blobs: list[bytes], size: int, batch: int, precision: str) -> float:
    """GpuDecode then both encoders on every batch, one process: clipscan's `embed.decode: gpu` actor."""
    from clipscan.models.registry import load_encoder
    from clipscan.stages.gpu_decode import GpuDecode

    stage = GpuDecode(size, 10**9, device=DEVICE)
    encoders = [load_encoder(spec, DEVICE, precision) for spec in models.values()]

    def run() -> None:
        for lo in range(0, len(blobs), batch):
            part = blobs[lo : lo + batch]
            n = len(part)
            rows = {"id": np.array([str(i) for i in range(n)], dtype=object),
                    "uri": np.array([""] * n, dtype=object), "image_bytes": np.array(part, dtype=object),
                    "skip_stage": np.array([""] * n, dtype=object), "skip_reason": np.array([""] * n, dtype=object)}
            pixels = stage(rows)["pixels"]
            for enc in encoders:
                enc.embed_images(pixels)

    run()  # warm-up
    return len(blobs) / timed(run, 2)


def knn_rate(n: int, d: int, k: int, block: int) -> dict[str, float]:
    """Exact top-k of every row of an (n, d) fp16 matrix against all rows, torch matmul + topk."""
    import torch

    g = torch.Generator(device=DEVICE).manual_seed(0)
    x = torch.nn.functional.normalize(torch.randn(n, d, device=DEVICE, generator=g), dim=1)
    x = x.half() if DEVICE == "cuda" else x

    def run() -> None:
        for lo in range(0, n, block):
            sims = x[lo : lo + block] @ x.T
            torch.topk(sims, k + 1, dim=1)

    run_block = lambda: torch.topk(x[:block] @ x.T, k + 1, dim=1)  # noqa: E731
    run_block()
    wall = timed(run, 1)
    return {"rows": n, "dim": d, "k": k, "wall_s": wall, "queries_per_s": n / wall,
            "tflops": 2 * n * n * d / wall / 1e12}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=2048, help="JPEGs per decode / pipeline measurement")
    parser.add_argument("--jpeg-size", type=int, default=384, help="side of the generated JPEGs, px (web images are larger than the model input)")
    parser.add_argument("--size", type=int, default=224, help="decoded side, px")
    parser.add_argument("--batches", type=int, nargs="*", default=[64, 256, 512, 1024])
    parser.add_argument("--knn-rows", type=int, default=1_000_000)
    parser.add_argument("--quick", action="store_true", help="small sizes: a smoke run in well under a minute")
    parser.add_argument("--tiny", action="store_true", help="the tiny test configs instead of ViT-B-32 / DINOv2-S (smoke runs)")
    parser.add_argument("--device", default="cuda", choices=["cuda", "cpu"],
                        help="cpu: run every part on the CPU as a smoke test of the script (figures meaningless)")
    args = parser.parse_args(argv)
    if args.quick:
        args.images, args.batches, args.knn_rows = 256, [64, 256], 100_000
    global DEVICE
    DEVICE = args.device

    import tempfile

    import torch

    if DEVICE == "cuda" and not torch.cuda.is_available():
        sys.exit("benchmarks/gpu.py needs a CUDA GPU (--device cpu runs it on the CPU as a smoke test)")
    name = torch.cuda.get_device_name(0) if DEVICE == "cuda" else "CPU (smoke run)"
    figures: dict[str, object] = {"gpu": name, "torch": torch.__version__}
    print(f"GPU: {figures['gpu']}, torch {torch.__version__}")

    started = time.perf_counter()
    blobs = jpegs(args.images, args.jpeg_size)
    figures["jpeg_kb"] = round(float(np.mean([len(b) for b in blobs])) / 1024, 1)
    dec = decode_rates(blobs, args.size, 256)
    figures["decode"] = dec
    print(f"\n1. decode, {args.images} JPEGs of {args.jpeg_size} px ({figures['jpeg_kb']} KB) -> {args.size} px")
    for name, rate in dec.items():
        print(f"   {name:24s} {rate:10.0f} img/s")

    with tempfile.TemporaryDirectory() as tmp:
        models = ({"tiny-clip": "open_clip:tiny-clip", "tiny-dinov2": "hf:tiny-dinov2"} if args.tiny
                  else load_models(Path(tmp)))
        from clipscan.stages.decode import decode_image

        pixels = np.stack([decode_image(b, args.size, 10**9)[0] for b in blobs[: max(args.batches)]]
                          * (-(-max(args.batches) // len(blobs))))[: max(args.batches)]
        enc = encoder_rates(models, pixels, args.batches, args.images)
        figures["encoders"] = enc
        print("\n2. encoders alone, img/s by batch size")
        print("   " + f"{'model':18s}" + "".join(f"{b:>9d}" for b in args.batches))
        for name, rates in enc.items():
            print("   " + f"{name:18s}" + "".join(f"{rates[str(b)]:9.0f}" for b in args.batches))

        best = max(args.batches, key=lambda b: enc["both bf16"][str(b)])
        pipe = {p: pipeline_rate(models, blobs, args.size, best, p) for p in ("fp16", "bf16")}
        figures["decode_plus_encoders"] = {"batch": best, **pipe}
        print(f"\n3. nvJPEG decode + {' + '.join(models)} in one process, batch {best}")
        for p, rate in pipe.items():
            print(f"   {p:6s} {rate:10.0f} img/s   (goal: 4,000 img/s per H100-class GPU)")

    knn = knn_rate(args.knn_rows, 512, 10, 8192)
    figures["knn"] = knn
    print(f"\n4. exact top-10 over {knn['rows']:,} x 512 fp16, torch matmul + topk: {knn['wall_s']:.1f} s, "
          f"{knn['queries_per_s']:,.0f} queries/s, {knn['tflops']:.0f} TFLOP/s")
    figures["wall_s"] = round(time.perf_counter() - started, 1)
    print(f"\nwhole check: {figures['wall_s']} s")
    print(json.dumps(figures))


if __name__ == "__main__":
    main()
