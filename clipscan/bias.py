"""The bias job: a ``BiasConfig`` in, a run directory out (probe set, ``bias.parquet``, ``bias.json``, report).

"CLIP Under the Microscope" (ComCO): the job renders its own seeded probe set of
multi-object scenes and single objects, writes it as a manifest corpus inside the run
directory, embeds its images with every probe in one pass of the DAF embedding pipeline
and its captions with each probe's text tower, and measures the text-order bias, the
image-size bias and the matching drop per probe. The stage logic is ``clipscan.stages.bias``.

Resume: a rerun of the same config reuses the probe set, the embedded image shards and
the caption embeddings it finds, and recomputes the figures (seconds).
"""

from __future__ import annotations

import logging
import re
import time

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from clipscan import fs as cfs
from clipscan.config import BiasConfig, DataConfig, JobConfig, ModelsConfig
from clipscan.rundir import Run

log = logging.getLogger("clipscan")


def model_names(probes: list[str]) -> dict[str, str]:
    """{directory-safe name: spec}, in the order of ``models.probes``: ``p0-open_clip-ViT-B-32-openai``."""
    names: dict[str, str] = {}
    for i, spec in enumerate(probes):
        if spec in names.values():
            raise ValueError(f"models.probes lists {spec!r} twice")
        names[f"p{i}-" + re.sub(r"[^A-Za-z0-9._-]+", "-", spec).strip("-")[:80]] = spec
    return names


def corpus_config(cfg: BiasConfig, manifest: str) -> JobConfig:
    """The job config the shared embedding stage reads: the probe set as a manifest corpus."""
    return JobConfig(
        data=DataConfig(path=manifest, format="manifest", caption="first", rows_per_block=cfg.rows_per_block),
        models=ModelsConfig(probe=cfg.models.probes[0]),
        output=cfg.output, seed=cfg.seed, embed=cfg.embed, report=cfg.report, ray=cfg.ray,
    )


def run_bias(cfg: BiasConfig, overwrite: bool = False) -> Run:
    """Run every bias stage into ``cfg.output``; returns the finished ``Run``.

    Writes ``probe_set/``, ``embeddings/``, ``text_embeddings/``, ``bias.parquet``,
    ``bias.json``, ``plots/`` and ``report.html``; ``run.json`` gets the counts, the stage
    timings and ``bias_summary`` (chance levels, scenes per position, per-object-count figures).
    """
    from clipscan.report.bias import write_bias_report
    from clipscan.runner import embed_corpus
    from clipscan.stages import bias

    names = model_names(cfg.models.probes)
    vocab = bias.vocabulary(cfg.bias.vocabulary)
    run = Run(cfg.output, "bias", cfg, overwrite=overwrite)
    started = time.perf_counter()
    root = run.path("probe_set")
    manifest = cfs.join(root, "manifest.parquet")
    job = corpus_config(cfg, manifest)  # the probe set is small: embedded in this process unless a cluster is named

    with run.stage("probe_set") as facts:
        reused = cfs.exists(manifest)
        if not reused:
            made = bias.write_probe_set(root, vocab, sorted(set(cfg.bias.objects)), cfg.bias.scenes, cfg.bias.orders,
                                        cfg.bias.areas, cfg.bias.single_area, cfg.bias.background,
                                        cfg.seed, cfg.embed.image_size)
            facts.update(made)
        scenes = cfs.read_parquet(cfs.join(root, "scenes.parquet"))
        captions = cfs.read_parquet(cfs.join(root, "captions.parquet"))
        facts.update(reused=reused, scenes=scenes.num_rows, objects=len(vocab), captions=captions.num_rows)

    counts = embed_corpus(run, job, names)
    if counts["skipped"]:
        raise RuntimeError(f"{counts['skipped']} probe images could not be embedded (see skipped.parquet)")

    with run.stage("caption_embed") as facts:
        text_towers = {name: text_tower_vectors(run, name, spec, captions, cfg) for name, spec in names.items()}
        cfs.remove_tree(run.path("_captions"))
        facts.update(models=len(names), with_text=sum(v is not None for v in text_towers.values()),
                     captions=captions.num_rows)

    with run.stage("analyse") as facts:
        width = max(cfg.bias.objects)
        tables, entries, summary = [], {}, {}
        for name, spec in names.items():
            scene_image, single_image = image_matrices(run.output, name, scenes, len(vocab))
            table = bias.scene_facts(spec, scenes, captions, scene_image, single_image, text_towers[name],
                                     cfg.seed, cfg.bias.distractors)
            tables.append(table)
            entries[spec], extra = bias.figures(table, width)
            by_count = {}
            for n in sorted(set(cfg.bias.objects)):
                part = table.filter(pc.equal(table.column("n_objects"), n))
                by_count[str(n)] = bias.figures(part, n)[0]
            summary[spec] = {**extra, "by_objects": by_count}
        facts_table = pa.concat_tables(tables)
        cfs.write_parquet_atomic(run.path("bias.parquet"), facts_table)
        result = {"models": entries}
        cfs.write_json_atomic(run.path("bias.json"), result)
        run.record("bias_summary", summary)
        facts.update(models=len(entries), rows=facts_table.num_rows)

    with run.stage("report") as facts:
        overview = {
            "probes": len(names), "scenes": scenes.num_rows, "objects_per_scene": sorted(set(cfg.bias.objects)),
            "vocabulary": len(vocab), "captions": captions.num_rows, "orders_per_scene_at_most": cfg.bias.orders,
            "seed": cfg.seed, "wall_s": round(time.perf_counter() - started, 1),
        }
        path = write_bias_report(run.output, overview, result, summary, scenes, captions, width,
                                 thumb=cfg.report.thumb)
        facts.update(path=path)
    run.finish()
    return run


def image_matrices(run_dir: str, name: str, scenes: pa.Table, n_vocab: int) -> tuple[np.ndarray, np.ndarray]:
    """(scene embeddings in ``scenes`` row order (S, d), single-object embeddings in vocabulary order (V, d))."""
    from clipscan.stages.bias import single_id
    from clipscan.stages.embed import load_embeddings

    ids, x = load_embeddings(run_dir, name)
    row = {str(i): k for k, i in enumerate(ids)}
    wanted = scenes.column("id").to_pylist()
    singles = [single_id(v) for v in range(n_vocab)]
    missing = [i for i in wanted + singles if i not in row]
    if missing:
        raise RuntimeError(f"embeddings/{name} lacks {len(missing)} probe images, e.g. {missing[:3]}")
    return x[[row[i] for i in wanted]], x[[row[i] for i in singles]]


def text_tower_vectors(run: Run, name: str, spec: str, captions: pa.Table, cfg: BiasConfig) -> np.ndarray | None:
    """(C, d) float32 caption embeddings by ``caption_id`` from the probe's text tower, or None without one.

    Kept in ``text_embeddings/<name>.parquet`` (``caption_id``, ``text``, ``embedding``;
    ``clipscan.stages.text.embed_captions``) and reused by a rerun over the same captions.
    """
    import ray

    from clipscan.stages.bias import known_text_tower, probe_has_text
    from clipscan.stages.text import embed_captions

    path = run.path("text_embeddings", f"{name}.parquet")
    if cfs.exists(path):
        kept = cfs.read_parquet(path)
        if kept.num_rows == captions.num_rows and "embedding" not in kept.column_names:
            return None  # an earlier run found no text tower
    here = not ray.is_initialized()  # the embedding stage ran in this process: no Ray was started
    has_text = known_text_tower(spec)
    if has_text is None:  # loaded to see: in a worker where the job runs on Ray
        has_text = probe_has_text(spec) if here else ray.get(ray.remote(num_cpus=1)(probe_has_text).remote(spec))
    if not has_text:
        log.info("%s has no text tower: image-size bias from image retrieval only", spec)
        cfs.write_parquet_atomic(path, pa.table({"caption_id": captions.column("caption_id")}))  # no embedding column
        return None
    emb, _ = embed_captions(path, captions.column("text").to_pylist(), spec, cfg.embed, cfg.bias.forward_rows,
                            here=here)
    return emb

