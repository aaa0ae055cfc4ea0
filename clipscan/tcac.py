"""The TCAC job: a ``TcacConfig`` in, a run directory out (caption pool, ``tcac.parquet``, report).

Section 3.2 of "Unveiling Glitches": every caption of the corpus is embedded once; each
image is scored against its pool of candidate captions before and after each harmless
transformation, and the images whose ranking moves most go to an LLM that names the
failure types per transformation. The stages themselves live in the ``clipscan.stages.tcac`` package.

Resume: the scoring pipeline writes its rows per input shard under ``_rows/``; a rerun
of the same config after a kill scores only the shards that were not written whole, and
reuses ``captions.parquet`` when it holds the same captions.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import numpy as np
import pyarrow as pa
import pyarrow.fs as pafs

from clipscan import fs as cfs
from clipscan.config import TcacConfig
from clipscan.rundir import Run
from clipscan.stages.tcac.collect import collect
from clipscan.stages.tcac.figures import caption_shifts
from clipscan.stages.tcac.pool import (
    CAPTION_MODEL,
    ShardPool,
    caption_texts,
    distinct_texts,
    local_shard,
    text_digest,
)
from clipscan.stages.tcac.repeats import settle_repeats
from clipscan.stages.tcac.score import build_tcac
from clipscan.stages.text import caption_vectors, embed_captions

if TYPE_CHECKING:
    import ray.data

    from clipscan.stages.summarise.result import Failures

log = logging.getLogger("clipscan")


def run_tcac(cfg: TcacConfig, overwrite: bool = False) -> Run:
    """Run every TCAC stage into ``cfg.output``; returns the finished ``Run``.

    Writes ``captions.parquet``, ``tcac.parquet``, ``skipped.parquet``, ``failures.json``,
    ``plots/`` and ``report.html``; ``run.json`` gets the counts, the stage timings and
    ``tcac_summary``.
    """
    from clipscan.data.corpus import plan_corpus, read_corpus
    from clipscan.data.read import recorded_shard_rows
    from clipscan.pipeline.cluster import in_process, init_ray
    from clipscan.report.tcac import write_tcac_report
    from clipscan.runner import write_here, write_shards
    from clipscan.stages import rows
    from clipscan.stages.tcac.score import local_stage
    from clipscan.stages.transforms import SeededTransforms

    SeededTransforms(cfg.tcac.transforms, cfg.seed)  # a bad transform fails here, before any work
    run = Run(cfg.output, "tcac", cfg, overwrite=overwrite)
    started = time.perf_counter()
    names = list(cfg.tcac.transforms)
    raw = run.path("_rows")

    records = run.path("inputs")  # each input shard's digest or tar facts: resume checks them as DAF's does

    def forget(shard: int) -> None:  # the input of this shard changed since an earlier run scored it
        cfs.remove_tree(cfs.join(raw, f"shard-{shard:05d}"))

    with run.stage("read") as facts:
        corpus, info = plan_corpus(cfg.data, lambda shard_rows: rows.complete_shards(raw, shard_rows),
                                   records=records, forget=forget, scratch=run.path("_read"),
                                   ray_up=lambda: init_ray(cfg))
        images = None if info["format"] == "webdataset" else sum(info["shard_rows"].values())
        facts.update({k: v for k, v in info.items() if k not in ("shard_rows", "sources")},
                     shards=len(info["shard_rows"]))
    # Below knn.stage_min_rows, with no cluster named, the captions are embedded, held by one
    # caption shard and the images scored in this process, and Ray is never started; else on
    # Ray, by caption shard actors and an actor pool, with the same results. WebDataset, whose
    # size is known only once read, goes to Ray.
    here = images is not None and corpus.blocks is not None and in_process(cfg, images)
    if not here:
        init_ray(cfg)
    # WebDataset: the read marks an id repeated within a block; the caption pool stage finds the rest
    repeats = run.path("_repeats") if info["format"] == "webdataset" else None
    pool: ShardPool | None = None
    shards = None
    try:
        with run.stage("caption_pool") as facts:
            if here:
                pool, pool_facts = local_pool(run, cfg)
            elif info["todo_shards"]:
                # every caption of the corpus, the scored shards' too: the pools do not depend on what a
                # killed run finished (a second read, of the caption columns)
                again = len(info["shard_rows"]) > info["todo_shards"]
                ds = read_corpus(cfg.data, records=records, scratch=run.path("_read"))[0] if again else corpus.dataset()
                partitions = max(1, int(info.get("shards") or len(info["shard_rows"])))
                shards, reused = caption_shards(cfg, ds, run.path("captions.parquet"), partitions, repeats)
                n_captions = shards.facts["images"]
                pool = ShardPool(shards.actors, min(cfg.tcac.pool_k, n_captions - 1))
                pool_facts = {"where": "shards", "captions": n_captions, "pool_k": pool.pool_k, "reused": reused,
                              "search": shards.facts}
                if shards.facts["index"] != "exact":  # an approximate caption index: its recall, on sampled captions
                    pool_facts["search"]["recall_at_k"] = round(pool.recall(sample_texts(shards.corpus, cfg)), 4)
                    run.record("recall", {"captions": pool_facts["search"]["recall_at_k"]})
            else:  # every input shard was scored by an earlier run: nothing asks for pools
                pool_facts = {"where": "shards", "captions": captions_count(run.path("captions.parquet")),
                              "reused": True}
            facts.update(pool_facts)
        with run.stage("score") as facts:
            if info["todo_shards"] and here:
                assert pool is not None and corpus.blocks is not None
                write_here(corpus.blocks, *local_stage(pool, cfg.models.probe, cfg.data, cfg.embed, cfg.tcac,
                                                       cfg.seed), raw, "score", images)
            elif info["todo_shards"]:
                assert pool is not None
                built = build_tcac(corpus.dataset(), pool, cfg.models.probe, cfg.data, cfg.embed, cfg.tcac, cfg.seed)
                write_shards(built, raw, "score", images or None)
            facts.update(executor="local" if here else "ray")
            if info.get("numbered"):  # WebDataset: the readers recorded each tar's row count as they read it
                info["shard_rows"] = recorded_shard_rows(records, info["sources"])[0]
            keep = max(cfg.tcac.report_top, cfg.attributes.cases if cfg.attributes.enabled else 0)
            counts, figures = collect(raw, run.output, names, info["shard_rows"], cfg.tcac.top, keep, repeats)
            facts.update(images_read=counts["read"], images_scored=counts["scored"],
                         images_skipped=counts["skipped"], rows=counts["rows"], transforms=len(names),
                         shards=len(info["shard_rows"]),
                         shards_reused=len(info["shard_rows"]) - info["todo_shards"])
    finally:
        if shards is not None:
            shards.close()
    run.count(**counts)
    if counts["read"] != counts["scored"] + counts["skipped"]:
        raise RuntimeError(f"row accounting does not add up: {counts}")

    with run.stage("summary") as facts:
        summary = figures.summary()  # gathered part by part by collect: no stage reads tcac.parquet whole
        run.record("tcac_summary", summary)
        facts.update(transforms=len(summary), rows_kept=figures.largest.num_rows)

    if cfg.attributes.enabled:
        with run.stage("attributes") as facts:
            from clipscan.stages.attributes import tcac_contrast

            contrast = tcac_contrast(figures.largest, names, cfg.attributes)
            cfs.write_json_atomic(run.path("attributes.json"), contrast)
            facts.update(top={t: (v["attributes"][0]["name"] if v["attributes"] else None)
                              for t, v in contrast["transforms"].items()})

    with run.stage("summarise") as facts:
        failures = name_failure_types(figures.largest, names, cfg, run)
        facts.update(backend=cfg.llm.backend, types={t: len(f.types) for t, f in failures.items()},
                     failed=[t for t, f in failures.items() if f.status == "failed"])

    with run.stage("report") as facts:
        overview = {
            "images": counts["scored"], "skipped": counts["skipped"], "probe": cfg.models.probe,
            "captions": pool_facts["captions"], "mean_pool": round(figures.mean_pool(), 2),
            "transforms": len(names), "top": cfg.tcac.top,
            "wall_s": round(time.perf_counter() - started, 1),
        }
        path = write_tcac_report(run.output, overview, summary, figures, cfg.tcac.transforms, seed=cfg.seed,
                                 image_size=cfg.embed.image_size, max_pixels=cfg.data.max_pixels,
                                 top=cfg.tcac.top, images=cfg.tcac.report_top, thumb=cfg.report.thumb,
                                 failures=failures)
        facts.update(path=path)
    cfs.remove_tree(raw)  # kept until here so that a run killed in a later stage does not score again
    cfs.remove_tree(run.path("_read"))  # a streamed manifest's duplicate rows
    run.finish()
    return run


def local_pool(run: Run, cfg: TcacConfig) -> tuple[ShardPool, dict[str, Any]]:
    """The caption pool of a corpus scored in this process: its distinct captions embedded
    once (``captions.parquet``, reused when an earlier run wrote the same captions) and held
    by one caption shard here, searched as the shard actors search. Returns the pool and its
    facts for run.json."""
    from clipscan.data.read import read_table

    rows = read_table(cfg.data)[0].select(["captions", "skip_stage"])  # the captions side, parsed again
    texts = sorted(distinct_texts(rows).column("text").to_pylist())
    if len(texts) < 2:
        raise ValueError(f"{cfg.data.path}: {len(texts)} distinct usable captions; TCAC needs captioned images")
    emb, reused = embed_captions(run.path("captions.parquet"), texts, cfg.models.probe, cfg.embed,
                                 cfg.tcac.forward_rows, here=True)
    pool = ShardPool([local_shard(texts, emb, cfg.knn, cfg.seed)], min(cfg.tcac.pool_k, len(texts) - 1))
    approximate = cfg.knn.index.strip().lower() != "flat"
    search: dict[str, Any] = {"shards": 1, "index": cfg.knn.index if approximate else "exact"}
    if approximate:  # its recall, on sampled captions
        rng = np.random.default_rng(cfg.seed)
        sample = rng.choice(len(texts), size=min(cfg.knn.recall_queries, len(texts)), replace=False)
        search["recall_at_k"] = round(pool.recall([texts[i] for i in sorted(sample)]), 4)
        run.record("recall", {"captions": search["recall_at_k"]})
    return pool, {"where": "local", "captions": len(texts), "pool_k": pool.pool_k, "reused": reused, "search": search}


def caption_shards(cfg: TcacConfig, ds: ray.data.Dataset, path: str, partitions: int = 1,
                   repeats: str | None = None) -> tuple[Any, bool]:
    """The corpus's distinct captions embedded once and held by caption shard actors (a
    started ``DatasetShards`` over ``id`` = text, model ``embedding``; close it when done),
    and whether they were reused. ``ds``: every row of the corpus; ``partitions``: of the
    distinct-caption group-by (the job gives one per input shard). With ``repeats`` (a folder,
    WebDataset), an id's later rows give no captions and are recorded there (``settle_repeats``).

    ``captions.parquet`` at ``path`` (parts) with its ``captions.json`` (count and digest of
    the texts, ``text_digest``) is reused when an earlier run of this directory wrote it for
    the same distinct captions; otherwise the captions are embedded and both are written,
    the digest last. The shards are asked for each scoring batch's pools, a light load
    beside the encoders, so they reserve no CPU and no GPU and search with one thread.
    """
    import ray.data

    from clipscan.stages.search import DatasetShards

    texts = caption_texts(settle_repeats(ds, repeats, partitions) if repeats else ds, partitions).materialize()
    digest = text_digest(texts)
    sidecar = cfs.join(cfs.dirname(path), "captions.json")
    reused = cfs.exists(sidecar) and json.loads(cfs.read_bytes(sidecar)) == digest
    if reused:
        fsys, inner = cfs.resolve(path)
        vectors = ray.data.read_parquet(inner, filesystem=fsys).rename_columns({"text": "id"})
    else:
        vectors = caption_vectors(texts, cfg.models.probe, cfg.embed, cfg.tcac.forward_rows)
    try:
        shards = DatasetShards(vectors, k=cfg.tcac.pool_k, index=cfg.knn.index,
                               nprobe=cfg.knn.nprobe, shards=cfg.knn.shards, train_sample=cfg.knn.train_sample,
                               seed=cfg.seed, device="cpu", models=(CAPTION_MODEL,), shard_cpus=0.0,
                               id_order=True).start()  # captions.parquet is written from it, sorted by text
    except ValueError as e:  # fewer than two captions
        raise ValueError(f"{cfg.data.path}: {e}; TCAC needs captioned images") from None
    if not reused:
        if cfs.exists(sidecar):  # the parts below are not the ones it describes until it is written again
            sys_, inner_ = cfs.resolve(sidecar)
            sys_.delete_file(inner_)
        write_captions(shards.corpus, path)
        cfs.write_json_atomic(sidecar, digest)
    return shards, reused


def sample_texts(ordered: ray.data.Dataset, cfg: TcacConfig) -> list[str]:
    """At most ``knn.recall_queries`` captions of the caption shards' input, sampled with the seed."""
    n = ordered.count()
    want = min(cfg.knn.recall_queries, n)
    fraction = min(1.0, 2.0 * want / max(n, 1))
    return [str(r["id"]) for r in ordered.select_columns(["id"]).random_sample(fraction, seed=cfg.seed).take(want)]


def write_captions(ordered: ray.data.Dataset, path: str) -> None:
    """The caption shards' input as ``captions.parquet``: a folder of parts (``text``, ``embedding``), sorted by text."""
    fsys, inner = cfs.resolve(path)
    if fsys.get_file_info(inner).type == pafs.FileType.File:  # an earlier run below knn.stage_min_rows wrote one file
        fsys.delete_file(inner)
    cfs.remove_tree(path)
    ordered.rename_columns({"id": "text"}).write_parquet(inner, filesystem=fsys)


def captions_count(path: str) -> int:
    """Rows of ``captions.parquet`` (a file or a folder of parts), from the Parquet footers."""
    import pyarrow.parquet as pq

    parts = [cfs.join(path, p.rsplit("/", 1)[-1]) for p in cfs.list_parquet(path)] or [path]
    total = 0
    for part in parts:
        fsys, inner = cfs.resolve(part)
        with cfs.named(part):
            total += pq.ParquetFile(fsys.open_input_file(inner)).metadata.num_rows
    return total


def shift_cases(shifts: list[dict[str, Any]]) -> pa.Table:
    """One transform's caption shifts as the summarise stage's cases: own caption, then the captions that entered."""
    return pa.table({
        "rank": pa.array(range(1, len(shifts) + 1), pa.int32()),
        "id": pa.array([s["id"] for s in shifts], pa.string()),
        "caption": pa.array([s["caption"] for s in shifts], pa.string()),
        "texts": pa.array([[s["caption"], *s["entered"]] for s in shifts], pa.list_(pa.string())),
        "neighbour_ids": pa.array([[] for _ in shifts], pa.list_(pa.string())),
    })


def name_failure_types(table: pa.Table, transforms: Sequence[str], cfg: TcacConfig, run: Run) -> dict[str, Failures]:
    """Per transform, the LLM's failure types for the images whose captions moved most
    (``failures.json``: the backend, the model and each transform's ``Failures``).

    table: at least the ``tcac.report_top`` largest changes of each transform (``Figures.largest``).

    Each transform's prompts and raw answers go to ``llm/<transform>/``; the cases are the
    ``tcac.report_top`` images with the largest change, each as its own caption followed
    by the captions that entered its top list after the transform (the paper's 4.2).
    """
    from clipscan.stages.summarise.result import Failures

    off = cfg.llm.backend == "off"
    if off:
        per = {name: Failures.off() for name in transforms}
    else:
        from clipscan.pipeline.cluster import init_ray
        from clipscan.stages.summarise import summarise_many
        from clipscan.stages.text import text_tower

        if cfg.llm.backend == "vllm":
            init_ray(cfg)  # Ray Data LLM serves the model; started as the job starts Ray
        shifts = caption_shifts(table, transforms, cfg.tcac.report_top)
        groups = {name: (shift_cases([s for s in shifts[name] if s["entered"]]), run.path("llm", name))
                  for name in transforms}
        # one backend run for every transform's prompts: one set of vLLM engines, not one per transform
        per = summarise_many(groups, cfg.llm, text_tower(cfg.models.probe))
    cfs.write_json_atomic(run.path("failures.json"), {
        "backend": cfg.llm.backend, "model": None if off else cfg.llm.model,
        "transforms": {name: per[name].to_json() for name in transforms}})
    return per
