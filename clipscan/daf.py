"""The DAF job: a ``DafConfig`` in, a run directory out (embeddings, neighbours, discrepancies, report).

Section 3.1 of "Unveiling Glitches": embed every image with the probe and the reference
model, find each image's top-k neighbours under both, and mine the images whose
neighbours disagree; the top cases go to an LLM that names the failure types.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import pyarrow as pa
import pyarrow.compute as pc

from clipscan import fs as cfs
from clipscan.config import DafConfig
from clipscan.rundir import Run

if TYPE_CHECKING:
    from clipscan.pipeline.executor import Executor
    from clipscan.stages.mine import Figures
    from clipscan.stages.summarise.result import Failures

log = logging.getLogger("clipscan")


def run_daf(cfg: DafConfig, overwrite: bool = False) -> Run:
    """Run every DAF stage into ``cfg.output``; returns the finished ``Run``."""
    from clipscan.report.daf import write_daf_report
    from clipscan.runner import embed_corpus, ensure_corpus
    from clipscan.stages import attributes

    if cfg.models.reference is None:
        raise ValueError("DAF needs models.reference (the visual reference model, e.g. hf:facebook/dinov2-small)")
    ensure_corpus(cfg)
    run = Run(cfg.output, "daf", cfg, overwrite=overwrite)
    started = time.perf_counter()
    counts = embed_corpus(run, cfg, {"probe": cfg.models.probe, "reference": cfg.models.reference})
    if counts["embedded"] < 2:
        raise ValueError(f"only {counts['embedded']} images could be embedded; DAF needs at least 2 (see skipped.parquet)")

    mined = search_and_mine(run, cfg, counts["embedded"])

    contrast, rows = None, None
    if cfg.attributes.enabled:
        with run.stage("attributes") as facts:
            rows = mined.contrast()
            contrast = attributes.run_contrast(rows, cfg.attributes,
                                               use_ray=None if mined.executor.name == "ray" else False)
            cfs.write_json_atomic(run.path("attributes.json"), contrast)
            top = contrast["attributes"][0] if contrast["attributes"] else {}
            facts.update(rows=rows.num_rows, pairs=contrast["pairs"], top=top.get("name"), top_ci=top.get("ci"))

    with run.stage("summarise") as facts:
        failures = summarise_cases(mined.cases, cfg, run)
        facts.update(backend=failures.backend, types=len(failures.types), status=failures.status,
                     reason=failures.reason, prompts=failures.prompts, parsed=failures.parsed, failed=failures.failed)

    if failures.types:
        with run.stage("judge") as facts:
            from clipscan.stages.summarise.judge import validate

            failures = validate(failures, rows, set(mined.cases.column("id").to_pylist()), cfg.llm, run.output)
            facts.update(failures.judge or {})

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
        path = write_daf_report(run.output, summary, mined.shown, mined.cases, failures,
                                       rows=cfg.report.rows, thumb=cfg.report.thumb, corpus=corpus,
                                       attributes=contrast, figures=mined.figures)
        facts.update(path=path)
    run.finish()
    return run


@dataclass
class Mined:
    """What the ``index`` and ``mine`` stages leave for the later stages: small tables, and
    look-ups that read only the ids they are asked for from the run's parts."""

    k: int  # neighbours compared
    figures: Figures  # the report's aggregates
    pairs: int  # MMVP pairs written
    cases: pa.Table  # cases.parquet
    candidates: pa.Table  # the top attribute-contrast rows with a probe-only neighbour, rank order
    shown: pa.Table  # the discrepancy rows of the case candidates, in rank order
    recall: dict[str, float] | None  # recall@k per model; None for exact search
    deep: dict[str, list[str]]  # the candidates' reference lists to the mining depth
    run_dir: str
    cfg: DafConfig
    executor: Executor

    def lookup(self, wanted: set[str]) -> pa.Table:
        """ids -> their ``id``, ``uri``, ``caption`` (``mine.corpus_rows``)."""
        from clipscan.stages import mine

        return mine.corpus_rows(self.run_dir, wanted, self.executor)

    def contrast(self) -> pa.Table:
        """The attribute contrast's rows (``attributes.build_rows``): the top
        ``attributes.cases`` candidates; agreeing pairs sampled in two passes over the
        discrepancy parts; captions and ranks looked up for the ids they name only."""
        from clipscan import fs as cfs
        from clipscan.stages import attributes, mine
        from clipscan.stages.discrepancy import corpus_lookup

        cfg, executor = self.cfg, self.executor
        ranked = cfs.join(self.run_dir, "discrepancies.parquet")
        top = self.candidates.slice(0, cfg.attributes.cases)
        matched = attributes.matched_pairs_parts(ranked, attributes.probe_only_cosines(top), cfg.seed,
                                                 cfg.attributes.bins, executor)
        deep = self.deep
        return attributes.build_rows(
            top, matched,
            ranks=lambda ids: mine.ranks_of(ranked, set(ids), cfg.mining.rank_by, executor),
            captions=lambda ids: corpus_lookup(self.lookup(set(ids)), ids),
            deep_reference=lambda ids: {i: deep[i] for i in ids if i in deep},
        )


def faiss_build() -> dict[str, Any]:
    """The FAISS build the driver loaded (``index.faiss_facts``), logged for the job log."""
    from clipscan.stages.index import faiss_facts

    build = faiss_facts()
    log.info("FAISS %s (%s build) sees %d GPU(s) in the driver", build["version"], build["build"], build["gpus"])
    return build


def search_and_mine(run: Run, cfg: DafConfig, rows: int) -> Mined:
    """The ``index`` and ``mine`` stages: the search over the run's embeddings into
    ``_search/`` parts, then ``discrepancies.parquet/`` and ``pairs.parquet/`` (parts) and
    ``cases.parquet``.

    Below ``knn.stage_min_rows`` rows both run in this process (one shard, the ``Local``
    executor): Ray's fixed cost per stage would be most of the time. Above it the shards
    are Ray actors and every per-part step a Ray task. The same stage code and the same
    bits either way. A rerun after a kill keeps the query blocks the search wrote.
    """
    from clipscan.pipeline.cluster import executor_for
    from clipscan.stages import discrepancy, mine
    from clipscan.stages.run_search import RunSearch

    scratch = run.path("_search")
    knn, mining = cfg.knn, cfg.mining
    executor = executor_for(cfg, rows)
    common = dict(k=knn.k, rank_depth=mining.rank_depth, index=knn.index, nprobe=knn.nprobe,
                  query_block=knn.query_block, train_sample=knn.train_sample, recall_queries=knn.recall_queries,
                  probe_min=mining.pair_probe_min, reference_max=mining.pair_reference_max, seed=cfg.seed,
                  device=knn.device)
    stage = RunSearch(cfg.output, where=executor.name, shards=knn.shards, search_actors=knn.search_actors,
                      **common)  # type: ignore[arg-type]
    try:
        with run.stage("index") as facts:
            build = faiss_build()
            stage.start()
            stage.write(scratch)
            model_facts = {key: stage.facts[key] for key in ("index", "nodes") if key in stage.facts}
            facts.update(stage.facts, faiss=build, probe=dict(model_facts), reference=dict(model_facts))
            recall = None
            if stage.facts["index"] != "exact":
                recall = {m: round(v, 4) for m, v in mine.recall(scratch, executor).items()}
                for model in ("probe", "reference"):
                    facts[model].update(nprobe=knn.nprobe, recall_at_k=recall[model])
        k = stage.facts["k"]
        if recall is not None:
            run.record("recall", recall)

        with run.stage("mine") as facts:
            wanted_rows = max(mining.cases, cfg.attributes.cases if cfg.attributes.enabled else 0)
            result = mine.mine(scratch, run.path("discrepancies.parquet"), run.path("pairs.parquet"),
                               mining.rank_by, k, executor, seed=cfg.seed, cases=wanted_rows)
            candidates = result.candidates
            top = candidates.slice(0, mining.cases)
            wanted = set(top.column("id").to_pylist())
            wanted.update(i for ids in top.column("probe_only").to_pylist() for i in ids)
            corpus = mine.corpus_rows(cfg.output, wanted, executor)
            case_table = discrepancy.cases(top, corpus, mining.cases)
            cfs.write_parquet_atomic(run.path("cases.parquet"), case_table)
            deep = {}
            if cfg.attributes.enabled:
                deep = stage.reference_lists(candidates.slice(0, cfg.attributes.cases).column("id").to_pylist())
            cfs.remove_tree(scratch)
            facts.update(images=result.figures.images, pairs=result.pairs, cases=case_table.num_rows,
                         mean_overlap=round(result.figures.mean_overlap, 4), executor=executor.name,
                         parts_reused=result.reused)
    finally:
        stage.close()
    return Mined(k, result.figures, result.pairs, case_table, candidates, top, recall, deep, cfg.output, cfg,
                 executor)


def report_ids(mined: Mined, rows: int, failures: Failures) -> set[str]:
    """The ids the report shows that the cases do not carry: the shown cases' reference
    neighbours and the failure types' examples."""
    top = mined.cases.sort_by("rank").slice(0, rows).column("id")
    shown = mined.shown.filter(pc.is_in(mined.shown.column("id"), value_set=top.combine_chunks()))
    wanted = {i for lst in shown.column("reference_neighbours").to_pylist() for i in lst}
    for f in failures.types:
        wanted.update(str(e) for e in (f.get("examples") or [])[:8])
    return wanted


def summarise_cases(cases: Any, cfg: DafConfig, run: Run) -> Failures:
    """Name the failure types of the top cases with the configured LLM backend (``failures.json``)."""
    from clipscan.stages.summarise import summarise

    if cfg.llm.backend == "off":
        return summarise(cases, cfg.llm, None, run.output)
    from clipscan.pipeline.cluster import init_ray
    from clipscan.stages.text import text_tower

    if cfg.llm.backend == "vllm":
        init_ray(cfg)  # Ray Data LLM serves the model; started as the job starts Ray
    return summarise(cases, cfg.llm, text_tower(cfg.models.probe), run.output)
