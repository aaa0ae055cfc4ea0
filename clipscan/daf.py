"""The DAF job: a ``DafConfig`` in, a run directory out (embeddings, neighbours, discrepancies, report).

Section 3.1 of "Unveiling Glitches": embed every image with the probe and the reference
model, find each image's top-k neighbours under both, and mine the images whose
neighbours disagree; the top cases go to an LLM that names the failure types.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from clipscan import fs as cfs
from clipscan.config import DafConfig
from clipscan.rundir import Run

if TYPE_CHECKING:
    from clipscan.stages.mine import Figures

log = logging.getLogger("clipscan")


def run_daf(cfg: DafConfig, overwrite: bool = False) -> Run:
    """Run every DAF stage into ``cfg.output``; returns the finished ``Run``."""
    from clipscan import report
    from clipscan.runner import embed_corpus, ensure_corpus, init_ray
    from clipscan.stages import attributes

    if cfg.models.reference is None:
        raise ValueError("DAF needs models.reference (the visual reference model, e.g. hf:facebook/dinov2-small)")
    ensure_corpus(cfg)
    run = Run(cfg.output, "daf", cfg, overwrite=overwrite)
    started = time.perf_counter()
    init_ray(cfg)
    counts = embed_corpus(run, cfg, {"probe": cfg.models.probe, "reference": cfg.models.reference})
    if counts["embedded"] < 2:
        raise ValueError(f"only {counts['embedded']} images could be embedded; DAF needs at least 2 (see skipped.parquet)")

    if counts["embedded"] < cfg.knn.stage_min_rows:
        mined = mine_in_driver(run, cfg)  # small: Ray's fixed cost per stage would be most of the time
    else:
        mined = search_and_mine(run, cfg)

    contrast, rows = None, None
    if cfg.attributes.enabled:
        with run.stage("attributes") as facts:
            rows = mined.contrast()
            contrast = attributes.run_contrast(rows, cfg.attributes)
            cfs.write_json_atomic(run.path("attributes.json"), contrast)
            top = contrast["attributes"][0] if contrast["attributes"] else {}
            facts.update(rows=rows.num_rows, pairs=contrast["pairs"], top=top.get("name"), top_ci=top.get("ci"))

    with run.stage("summarise") as facts:
        failures = summarise_cases(mined.cases, cfg, run)
        facts.update(backend=cfg.llm.backend, types=len(failures.get("types", [])),
                     status=failures.get("status", "done"), reason=failures.get("reason"),
                     **{k: failures[k] for k in ("prompts", "parsed", "failed") if k in failures})

    if failures.get("types"):
        with run.stage("judge") as facts:
            from clipscan.stages.summarise.judge import validate

            failures = validate(failures, rows, set(mined.cases.column("id").to_pylist()), cfg.llm, run.output)
            facts.update(failures.get("judge", {}))

    with run.stage("report") as facts:
        summary = {
            "images": mined.figures.images, "skipped": counts["skipped"], "k": mined.k,
            "mean_overlap": mined.figures.mean_overlap,
            "probe": cfg.models.probe, "reference": cfg.models.reference,
            "pairs": mined.pairs, "wall_s": round(time.perf_counter() - started, 1),
        }
        if mined.recall is not None:
            summary["recall"] = mined.recall
        corpus = mined.lookup(report_ids(mined, cfg.report.rows, failures))
        path = report.write_daf_report(run.output, summary, mined.shown, mined.cases, failures,
                                       rows=cfg.report.rows, thumb=cfg.report.thumb, corpus=corpus,
                                       attributes=contrast, figures=mined.figures)
        facts.update(path=path)
    run.finish()
    return run


@dataclass
class Mined:
    """What the ``index`` and ``mine`` stages leave for the later stages: small tables and
    look-ups that fetch only the ids they are asked for."""

    k: int  # neighbours compared
    figures: Figures  # the report's aggregates
    pairs: int  # MMVP pairs written
    cases: pa.Table  # cases.parquet
    shown: pa.Table  # the discrepancy rows of the case candidates, in rank order
    recall: dict[str, float] | None  # recall@k per model; None for exact search
    lookup: Callable[[set[str]], pa.Table]  # ids -> their id, uri, caption
    contrast: Callable[[], pa.Table]  # the attribute contrast's rows (``attributes.build_rows``)


def faiss_build() -> dict[str, Any]:
    """The FAISS build the driver loaded (``index.faiss_facts``), logged for the job log."""
    from clipscan.stages.index import faiss_facts

    build = faiss_facts()
    log.info("FAISS %s (%s build) sees %d GPU(s) in the driver", build["version"], build["build"], build["gpus"])
    return build


def mine_in_driver(run: Run, cfg: DafConfig) -> Mined:
    """The ``index`` and ``mine`` stages in this process, for corpora below
    ``knn.stage_min_rows``: the same results as ``search_and_mine`` (the tests hold them
    to the same bits), without the seconds each Ray Data stage costs to start."""
    from clipscan.report import daf_figures
    from clipscan.stages import attributes, discrepancy, index
    from clipscan.stages.embed import load_corpus, load_embeddings
    with run.stage("index") as facts:
        build = faiss_build()
        ids, x_probe = load_embeddings(cfg.output, "probe")
        ref_ids, x_ref = load_embeddings(cfg.output, "reference")
        if not np.array_equal(ids, ref_ids):
            raise RuntimeError("probe and reference embeddings cover different ids")
        k = min(cfg.knn.k, len(ids) - 1)
        probe_D, probe_I, pf = index.self_neighbours(x_probe, cfg.knn, k, cfg.seed)
        ref_D, ref_I, rf = index.self_neighbours(x_ref, cfg.knn, max(k, cfg.mining.rank_depth), cfg.seed)
        facts.update(where="driver", faiss=build, images=len(ids), k=k, probe=pf, reference=rf)
    recall = None
    if "recall_at_k" in pf:
        recall = {"probe": pf["recall_at_k"], "reference": rf["recall_at_k"]}
        run.record("recall", recall)

    with run.stage("mine") as facts:
        table = discrepancy.mine(ids, probe_D, probe_I, ref_D, ref_I, x_probe, x_ref, k, rank_by=cfg.mining.rank_by)
        pair_table = discrepancy.pairs(ids, probe_D, probe_I, ref_D, ref_I, x_probe, x_ref,
                                       probe_min=cfg.mining.pair_probe_min,
                                       reference_max=cfg.mining.pair_reference_max, k=k)
        corpus = load_corpus(cfg.output)
        case_table = discrepancy.cases(table, corpus, cfg.mining.cases)
        for name, part in (("discrepancies.parquet", table), ("pairs.parquet", pair_table)):
            cfs.remove_tree(run.path(name))  # the same layout as the stage's: a folder of parts
            cfs.write_parquet_atomic(cfs.join(run.path(name), "part-00000.parquet"), part)
        cfs.write_parquet_atomic(run.path("cases.parquet"), case_table)
        figures = daf_figures(table, cfg.seed)
        facts.update(images=table.num_rows, pairs=pair_table.num_rows, cases=case_table.num_rows,
                     mean_overlap=round(figures.mean_overlap, 4))
    has_only = pc.greater(pc.list_value_length(table.column("probe_only")), 0)
    shown = table.filter(has_only).slice(0, cfg.mining.cases)

    def lookup(wanted: set[str]) -> pa.Table:
        found = corpus.filter(pc.is_in(corpus.column("id"), value_set=pa.array(sorted(wanted), pa.string())))
        return found.select(["id", "uri", "caption"])

    def contrast() -> pa.Table:
        return attributes.contrast_rows(table, corpus, cfg.attributes.cases, cfg.seed, cfg.attributes.bins,
                                        deep_reference=attributes.deep_lookup(ids, ref_I))

    return Mined(k, figures, pair_table.num_rows, case_table, shown, recall, lookup, contrast)


def search_and_mine(run: Run, cfg: DafConfig) -> Mined:
    """The ``index`` and ``mine`` stages: sharded search over the run's embeddings into
    ``_search/`` parts, then ``discrepancies.parquet/`` and ``pairs.parquet/`` (parts) and
    ``cases.parquet``. The shard actors live until the attribute cases' reference lists
    are read back from them."""

    from clipscan.stages import discrepancy, mine, search

    scratch = run.path("_search")
    knn, mining = cfg.knn, cfg.mining
    stage = search.ShardedSearch(
        search.vectors_from_run(cfg.output), k=knn.k, rank_depth=mining.rank_depth, index=knn.index,
        nprobe=knn.nprobe, shards=knn.shards, query_block=knn.query_block, train_sample=knn.train_sample,
        recall_queries=knn.recall_queries, probe_min=mining.pair_probe_min,
        reference_max=mining.pair_reference_max, search_actors=knn.search_actors, seed=cfg.seed,
        device=knn.device,
    )
    try:
        with run.stage("index") as facts:
            build = faiss_build()
            stage.start()
            stage.write(scratch)
            model_facts = {key: stage.facts[key] for key in ("index", "nodes") if key in stage.facts}
            facts.update(stage.facts, faiss=build, probe=dict(model_facts), reference=dict(model_facts))
            rows = mine.read_parts(scratch)
            recall = None
            if stage.facts["index"] != "exact":
                recall = {m: round(v, 4) for m, v in mine.recall(rows).items()}
                for model in ("probe", "reference"):
                    facts[model].update(nprobe=knn.nprobe, recall_at_k=recall[model])
        k = stage.facts["k"]
        if recall is not None:
            run.record("recall", recall)

        with run.stage("mine") as facts:
            wanted_rows = max(mining.cases, cfg.attributes.cases if cfg.attributes.enabled else 0)
            figures, candidates = mine.write_ranked(rows, run.path("discrepancies.parquet"), mining.rank_by, k,
                                                    seed=cfg.seed, cases=wanted_rows)
            pair_count = mine.write_pairs(rows, run.path("pairs.parquet"))
            top = candidates.slice(0, mining.cases)
            wanted = set(top.column("id").to_pylist())
            wanted.update(i for ids in top.column("probe_only").to_pylist() for i in ids)
            corpus = mine.corpus_rows(stage.corpus, wanted)
            case_table = discrepancy.cases(top, corpus, mining.cases)
            cfs.write_parquet_atomic(run.path("cases.parquet"), case_table)
            deep = {}
            if cfg.attributes.enabled:
                deep = stage.reference_lists(candidates.slice(0, cfg.attributes.cases).column("id").to_pylist())
            cfs.remove_tree(scratch)
            facts.update(images=figures.images, pairs=pair_count, cases=case_table.num_rows,
                         mean_overlap=round(figures.mean_overlap, 4))
    finally:
        stage.close()
    ranked = mine.read_parts(run.path("discrepancies.parquet"))
    searched = stage.corpus

    def lookup(wanted: set[str]) -> pa.Table:
        return mine.corpus_rows(searched, wanted)

    def contrast() -> pa.Table:
        # the top attributes.cases candidates; agreeing pairs sampled in two streaming passes
        # over the ranked parts; captions and ranks looked up for the ids they name only
        from clipscan.stages import attributes
        from clipscan.stages.discrepancy import corpus_lookup

        top = candidates.slice(0, cfg.attributes.cases)
        matched = attributes.matched_pairs_dataset(ranked, attributes.probe_only_cosines(top), cfg.seed,
                                                   cfg.attributes.bins)
        return attributes.build_rows(
            top, matched,
            ranks=lambda ids: mine.ranks_of(ranked, set(ids)),
            captions=lambda ids: corpus_lookup(lookup(set(ids)), ids),
            deep_reference=lambda ids: {i: deep[i] for i in ids if i in deep},
        )

    return Mined(k, figures, pair_count, case_table, candidates.slice(0, mining.cases), recall, lookup, contrast)


def report_ids(mined: Mined, rows: int, failures: dict[str, Any]) -> set[str]:
    """The ids the report shows that the cases do not carry: the shown cases' reference
    neighbours and the failure types' examples."""
    top = mined.cases.sort_by("rank").slice(0, rows).column("id")
    shown = mined.shown.filter(pc.is_in(mined.shown.column("id"), value_set=top.combine_chunks()))
    wanted = {i for lst in shown.column("reference_neighbours").to_pylist() for i in lst}
    for f in failures.get("failure_types") or failures.get("types") or []:
        if isinstance(f, dict):
            wanted.update(str(e) for e in (f.get("examples") or [])[:8])
    return wanted


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
