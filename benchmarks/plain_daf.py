"""The paper's DAF as one plain script: PIL, the models' own preprocessing, torch, numpy. The baseline clipscan must beat.

What a researcher writes without clipscan, step by step as section 3.1 describes it: open
each image with PIL, preprocess it with each model's own transform, embed it with the
probe (open_clip) and the reference (transformers DINOv2), then numpy top-10 cosine
neighbours under each model (self excluded) and overlap@10 per image. One process,
every thread torch wants. Prints one JSON line: images, wall seconds (whole script,
model loading included), images/s and the mean overlap.

    python benchmarks/plain_daf.py --manifest DIR/manifest.parquet --reference DINOV2_DIR [--batch 1]
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

START = time.perf_counter()

import numpy as np  # noqa: E402


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--manifest", required=True, help="manifest.parquet with an `image` column")
    parser.add_argument("--probe", default="ViT-B-32", help="open_clip model name (random weights)")
    parser.add_argument("--reference", required=True, help="a DINOv2 save_pretrained folder")
    parser.add_argument("--batch", type=int, default=1, help="images per forward pass (1: one image at a time)")
    parser.add_argument("--k", type=int, default=10)
    args = parser.parse_args(argv)

    import open_clip
    import pyarrow.parquet as pq
    import torch
    import transformers
    from PIL import Image

    clip, _, preprocess = open_clip.create_model_and_transforms(args.probe)
    dino = transformers.AutoModel.from_pretrained(args.reference)
    processor = transformers.AutoImageProcessor.from_pretrained(args.reference)
    clip.eval()
    dino.eval()

    root = Path(args.manifest).parent
    paths = [root / p for p in pq.read_table(args.manifest, columns=["image"]).column("image").to_pylist()]
    probe, reference = [], []
    with torch.no_grad():
        for lo in range(0, len(paths), args.batch):
            images = [Image.open(p).convert("RGB") for p in paths[lo : lo + args.batch]]
            probe.append(clip.encode_image(torch.stack([preprocess(im) for im in images])).numpy())
            pixels = processor(images=images, return_tensors="pt")["pixel_values"]
            reference.append(dino(pixel_values=pixels).pooler_output.numpy())

    def top_k(x: np.ndarray) -> np.ndarray:
        x = x / np.linalg.norm(x, axis=1, keepdims=True)
        sims = x @ x.T
        np.fill_diagonal(sims, -np.inf)
        return np.argsort(-sims, axis=1)[:, : args.k]

    a, b = top_k(np.concatenate(probe)), top_k(np.concatenate(reference))
    overlap = np.array([len(set(a[i]) & set(b[i])) for i in range(len(a))])
    wall = time.perf_counter() - START
    print(json.dumps({"images": len(paths), "wall_s": round(wall, 2), "images_per_s": round(len(paths) / wall, 2),
                      "mean_overlap": round(float(overlap.mean()), 3), "batch": args.batch}))


if __name__ == "__main__":
    main()
