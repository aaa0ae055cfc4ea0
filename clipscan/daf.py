"""The DAF job: a ``DafConfig`` in, a run directory out (embeddings, neighbours, discrepancies, report).

Section 3.1 of "Unveiling Glitches": embed every image with the probe and the reference
model, find each image's top-k neighbours under both, and mine the images whose
neighbours disagree; the top cases go to an LLM that names the failure types.
"""

from __future__ import annotations

import logging
import time
from typing import Any

import numpy as np

from clipscan import fs as cfs
from clipscan.config import DafConfig, KnnConfig
from clipscan.rundir import Run

log = logging.getLogger("clipscan")


def neighbours(x: np.ndarray, cfg: KnnConfig, depth: int, seed: int) -> tuple[np.ndarray, np.ndarray, dict[str, Any]]:
    """Top-``depth`` neighbours of every row of x (n, d) float32 L2-normalised, self excluded.

    Exact sharded search for ``knn.index: Flat``; otherwise the FAISS factory index, with
    its recall@k against exact search measured on ``knn.recall_queries`` rows. Returns
    D (n, depth) float32, I (n, depth) int64 and facts for run.json (index, wall_s; the
    number of nodes that ran search tasks; the recall).
    """
    from clipscan.stages import index

    depth = min(depth, len(x) - 1)
    start = time.perf_counter()
    if cfg.index.strip().lower() == "flat":
        nodes: set[str] = set()
        D, I = index.sharded_self_knn(x, depth, shards=cfg.shards, query_block=cfg.query_block, nodes=nodes,
                                      device=cfg.device)
        return D, I, {"index": "exact", "nodes": len(nodes), "wall_s": round(time.perf_counter() - start, 3)}
    D, I = index.approx_self_knn(x, depth, index=cfg.index, nprobe=cfg.nprobe,
                                 train_sample=cfg.train_sample, seed=seed, query_block=cfg.query_block)
    k = min(cfg.k, depth)
    recall = index.measure_recall(x, k, I[:, :k], n_queries=min(cfg.recall_queries, len(x)), seed=seed)
    return D, I, {"index": cfg.index, "nprobe": cfg.nprobe, "recall_at_k": round(float(recall), 4),
                  "wall_s": round(time.perf_counter() - start, 3)}


def run_daf(cfg: DafConfig, overwrite: bool = False) -> Run:
    """Run every DAF stage into ``cfg.output``; returns the finished ``Run``."""
    from clipscan import report
    from clipscan.runner import embed_corpus, ensure_corpus, init_ray
    from clipscan.stages import discrepancy
    from clipscan.stages.embed import load_corpus, load_embeddings

    if cfg.models.reference is None:
        raise ValueError("DAF needs models.reference (the visual reference model, e.g. hf:facebook/dinov2-small)")
    ensure_corpus(cfg)
    run = Run(cfg.output, "daf", cfg, overwrite=overwrite)
    started = time.perf_counter()
    init_ray(cfg)
    counts = embed_corpus(run, cfg, {"probe": cfg.models.probe, "reference": cfg.models.reference})
    if counts["embedded"] < 2:
        raise ValueError(f"only {counts['embedded']} images could be embedded; DAF needs at least 2 (see skipped.parquet)")

    with run.stage("index") as facts:
        from clipscan.stages.index import faiss_facts

        build = faiss_facts()
        log.info("FAISS %s (%s build) sees %d GPU(s) in the driver", build["version"], build["build"], build["gpus"])
        facts.update(faiss=build)
        ids, x_probe = load_embeddings(cfg.output, "probe")
        ref_ids, x_ref = load_embeddings(cfg.output, "reference")
        if not np.array_equal(ids, ref_ids):
            raise RuntimeError("probe and reference embeddings cover different ids")
        k = min(cfg.knn.k, len(ids) - 1)
        probe_D, probe_I, pf = neighbours(x_probe, cfg.knn, k, cfg.seed)
        ref_D, ref_I, rf = neighbours(x_ref, cfg.knn, max(k, cfg.mining.rank_depth), cfg.seed)
        facts.update(images=len(ids), k=k, probe=pf, reference=rf)
    if "recall_at_k" in pf:
        run.record("recall", {"probe": pf["recall_at_k"], "reference": rf["recall_at_k"]})

    with run.stage("mine") as facts:
        table = discrepancy.mine(ids, probe_D, probe_I, ref_D, ref_I, x_probe, x_ref, k, rank_by=cfg.mining.rank_by)
        pair_table = discrepancy.pairs(ids, probe_D, probe_I, ref_D, ref_I, x_probe, x_ref,
                                       probe_min=cfg.mining.pair_probe_min,
                                       reference_max=cfg.mining.pair_reference_max, k=k)
        corpus = load_corpus(cfg.output)
        case_table = discrepancy.cases(table, corpus, cfg.mining.cases)
        cfs.write_parquet_atomic(run.path("discrepancies.parquet"), table)
        cfs.write_parquet_atomic(run.path("pairs.parquet"), pair_table)
        cfs.write_parquet_atomic(run.path("cases.parquet"), case_table)
        mean_overlap = float(np.mean(table.column("overlap").to_numpy()))
        facts.update(images=table.num_rows, pairs=pair_table.num_rows, cases=case_table.num_rows,
                     mean_overlap=round(mean_overlap, 4))

    contrast, rows = None, None
    if cfg.attributes.enabled:
        with run.stage("attributes") as facts:
            from clipscan.stages import attributes

            rows = attributes.contrast_rows(table, corpus, cfg.attributes.cases, cfg.seed, cfg.attributes.bins,
                                            deep_reference=attributes.deep_lookup(ids, ref_I))
            contrast = attributes.run_contrast(rows, cfg.attributes)
            cfs.write_json_atomic(run.path("attributes.json"), contrast)
            top = contrast["attributes"][0] if contrast["attributes"] else {}
            facts.update(rows=rows.num_rows, pairs=contrast["pairs"], top=top.get("name"), top_ci=top.get("ci"))

    with run.stage("summarise") as facts:
        failures = summarise_cases(case_table, cfg, run)
        facts.update(backend=cfg.llm.backend, types=len(failures.get("types", [])),
                     status=failures.get("status", "done"), reason=failures.get("reason"),
                     **{k: failures[k] for k in ("prompts", "parsed", "failed") if k in failures})

    if failures.get("types"):
        with run.stage("judge") as facts:
            from clipscan.stages.summarise.judge import validate

            failures = validate(failures, rows, set(case_table.column("id").to_pylist()), cfg.llm, run.output)
            facts.update(failures.get("judge", {}))

    with run.stage("report") as facts:
        summary = {
            "images": len(ids), "skipped": counts["skipped"], "k": k, "mean_overlap": mean_overlap,
            "probe": cfg.models.probe, "reference": cfg.models.reference,
            "pairs": pair_table.num_rows, "wall_s": round(time.perf_counter() - started, 1),
        }
        if "recall_at_k" in pf:
            summary["recall"] = {"probe": pf["recall_at_k"], "reference": rf["recall_at_k"]}
        path = report.write_daf_report(run.output, summary, table, case_table, failures,
                                       rows=cfg.report.rows, thumb=cfg.report.thumb, corpus=corpus,
                                       attributes=contrast)
        facts.update(path=path)
    run.finish()
    return run


def summarise_cases(cases: Any, cfg: DafConfig, run: Run) -> dict[str, Any]:
    """Name the failure types of the top cases with the configured LLM backend (``failures.json``)."""
    if cfg.llm.backend == "off":
        failures: dict[str, Any] = {"backend": "off", "types": []}
        cfs.write_json_atomic(run.path("failures.json"), failures)
        return failures
    from clipscan.models.registry import is_precomputed, load_encoder
    from clipscan.stages.summarise import summarise

    text_encoder = None  # precomputed image embeddings come without a text tower
    if not is_precomputed(cfg.models.probe):
        encoder = load_encoder(cfg.models.probe)
        text_encoder = encoder.embed_texts if encoder.has_text else None
    return summarise(cases, cfg.llm, text_encoder, run.output)
