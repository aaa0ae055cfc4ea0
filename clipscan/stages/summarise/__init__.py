"""Failure cases (``cases.parquet`` rows) in, canonical failure types out (``failures.json``, ``llm_raw.jsonl``).

DAF step 5 (section 3.1.4 and Figure 2 of "Unveiling Glitches"): the cases are packed
into prompts of the paper's format under a token budget, a local LLM names the failure
types of each prompt, and the types of all prompts are merged into canonical ones.

By role: ``prompts`` (template, fencing, packing), ``parsing`` (the ``FailureAnswer``
model: its schema for structured output, its validation for parsing), ``merging``
(canonical types), ``backends`` (openai and vllm). ``summarise`` here is the stage. An
answer that does not parse is kept raw in ``llm_raw.jsonl``, retried once and counted;
it never stops the job.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import time
from collections.abc import Callable, Mapping

import numpy as np
import pyarrow as pa

from clipscan import fs as cfs
from clipscan.config import LlmConfig
from clipscan.stages.summarise import backends as backends  # noqa: PLC0414  (the modules, for patching)
from clipscan.stages.summarise import prompts as prompts  # noqa: PLC0414
from clipscan.stages.summarise.backends import (
    RETRY_TEMPERATURE,
    RETRYABLE_HTTP,
    Attempt,
    RequestError,
    chat_body,
    post_json,
    response_format,
    run_openai,
    run_vllm,
    vllm_processor_kwargs,
)
from clipscan.stages.summarise.merging import STOP_WORDS, Found, merge_failures, normalise_heading
from clipscan.stages.summarise.parsing import (
    FAILURES_SCHEMA,
    MAX_DESCRIPTION_CHARS,
    MAX_ITEMS,
    MAX_TYPE_CHARS,
    FailureAnswer,
    FailureItem,
    clean_text,
    parse_answer,
    validate_answer,
)
from clipscan.stages.summarise.prompts import (
    CASES_PLACEHOLDER,
    CHARS_PER_TOKEN,
    CHAT_OVERHEAD_TOKENS,
    DEFAULT_TEMPLATE,
    FENCE_RE,
    MIN_CAPTION_CHARS,
    REQUIRED_COLUMNS,
    STAGE,
    Case,
    Prompt,
    PromptTemplate,
    TokenCounter,
    case_line,
    cases_from_table,
    fence,
    fence_marker,
    load_template,
    load_token_counter,
    pack_cases,
    render_prompt,
    unfence,
)
from clipscan.stages.summarise.result import Failures

__all__ = [
    "CASES_PLACEHOLDER", "CHARS_PER_TOKEN", "CHAT_OVERHEAD_TOKENS", "DEFAULT_TEMPLATE", "FAILURES_SCHEMA",
    "FENCE_RE", "MAX_DESCRIPTION_CHARS", "MAX_ITEMS", "MAX_TYPE_CHARS", "MIN_CAPTION_CHARS", "REQUIRED_COLUMNS",
    "RETRYABLE_HTTP", "RETRY_TEMPERATURE", "STAGE", "STOP_WORDS", "Attempt", "Case", "FailureAnswer",
    "FailureItem", "Found", "Prompt", "PromptTemplate", "RequestError", "TokenCounter", "case_line",
    "cases_from_table", "chat_body", "clean_text", "fence", "fence_marker", "load_template",
    "load_token_counter", "merge_failures", "normalise_heading", "pack_cases", "parse_answer",
    "backends", "post_json", "prompts", "render_prompt", "response_format", "run_openai", "run_vllm", "summarise", "summarise_many",
    "unfence", "validate_answer", "vllm_processor_kwargs",
]

log = logging.getLogger("clipscan")



def summarise(
    cases: pa.Table,
    cfg: LlmConfig,
    text_encoder: Callable[[list[str]], np.ndarray] | None,
    out_dir: str,
) -> Failures:
    """Name and merge the failure types of ``cases``; writes ``failures.json`` and ``llm_raw.jsonl``.

    ``text_encoder``: texts -> (n, d) float32 L2-normalised (the probe's), used to merge
    failure types; None merges by normalised heading only. Returns the ``Failures``.
    Answers that do not parse are recorded and counted; no answer makes this raise. When
    not one prompt's answer parses, ``status`` is "failed" with the ``reason`` (the job
    records the stage as failed and carries on to the report).
    """
    return summarise_many({"": (cases, out_dir)}, cfg, text_encoder)[""]


def summarise_many(
    groups: Mapping[str, tuple[pa.Table, str]],
    cfg: LlmConfig,
    text_encoder: Callable[[list[str]], np.ndarray] | None,
) -> dict[str, Failures]:
    """``summarise`` for several case tables (name -> (cases, out_dir)) with one backend run
    for the prompts of all of them: one set of vLLM engines for every TCAC transform, not
    one per transform. Each group gets its own ``failures.json`` and ``llm_raw.jsonl``."""
    if cfg.backend == "off":
        for _, out_dir in groups.values():
            cfs.write_json_atomic(cfs.join(out_dir, "failures.json"), Failures.off().to_json())
        return {name: Failures.off() for name in groups}

    started = time.perf_counter()
    template = load_template(cfg.prompt)
    counter = load_token_counter(cfg.tokenizer or cfg.model)
    prepared: dict[str, tuple[list[Case], list[Prompt], int, str]] = {}
    every: list[Prompt] = []
    for name, (cases, out_dir) in groups.items():
        case_list = cases_from_table(cases)
        packed = pack_cases(case_list, template, cfg.max_prompt_tokens, cfg.cases_per_prompt, counter)
        log.info("%s: %s%d cases in %d prompts (%s, budget %d tokens), backend %s", STAGE,
                 f"{name}: " if name else "", len(case_list), len(packed), counter.name, cfg.max_prompt_tokens,
                 cfg.backend)
        prepared[name] = (case_list, packed, len(every), out_dir)
        every += [dataclasses.replace(p, index=len(every) + p.index) for p in packed]
    attempts_all = _answer(every, cfg)
    out = {}
    for name, (case_list, group, offset, out_dir) in prepared.items():
        attempts = [dataclasses.replace(a, prompt=a.prompt - offset) for a in attempts_all
                    if offset <= a.prompt < offset + len(group)]
        out[name] = _finish(case_list, group, attempts, cfg, text_encoder, out_dir, template, counter, started)
    return out


def _answer(prompts: list[Prompt], cfg: LlmConfig) -> list[Attempt]:
    if not prompts:
        attempts: list[Attempt] = []
    elif cfg.backend == "openai":
        attempts = run_openai(prompts, cfg)
    elif cfg.backend == "vllm":
        try:
            attempts = run_vllm(prompts, cfg)
        except Exception as e:  # an engine that cannot start leaves a recorded failure, not a lost run
            log.error("%s: the vLLM processor failed: %s", STAGE, e, exc_info=True)
            reason = f"engine failed: {type(e).__name__}: {str(e)[:500]}"
            attempts = [Attempt(p.index, 0, error=reason).parse() for p in prompts]
    else:
        raise ValueError(f"{STAGE}: unknown llm.backend {cfg.backend!r} (off | openai | vllm)")
    return attempts


def _finish(
    case_list: list[Case],
    prompts: list[Prompt],
    attempts: list[Attempt],
    cfg: LlmConfig,
    text_encoder: Callable[[list[str]], np.ndarray] | None,
    out_dir: str,
    template: PromptTemplate,
    counter: TokenCounter,
    started: float,
) -> Failures:
    failures_path = cfs.join(out_dir, "failures.json")
    by_prompt = {p.index: p for p in prompts}
    final: dict[int, Attempt] = {}
    raw_lines = []
    for a in attempts:
        final[a.prompt] = a if a.prompt not in final or a.attempt >= final[a.prompt].attempt else final[a.prompt]
        p = by_prompt[a.prompt]
        raw_lines.append(json.dumps({
            "prompt": a.prompt, "attempt": a.attempt, "status": "ok" if a.ok else "failed",
            "reason": a.reason, "answer": a.answer, "finish_reason": a.finish_reason,
            "types": len(a.items) if a.items is not None else None, "prompt_tokens": p.tokens,
            "usage": a.usage, "elapsed_s": a.elapsed_s, "cases": list(p.case_ids),
        }, ensure_ascii=False))
    cfs.write_bytes_atomic(cfs.join(out_dir, "llm_raw.jsonl"), ("\n".join(raw_lines) + "\n").encode() if raw_lines else b"")

    found = [
        Found(p.index, item["type"], item["description"], p.case_ids)
        for p in prompts
        if p.index in final and final[p.index].ok
        for item in final[p.index].items or []
    ]
    order = {c.id: i for i, c in enumerate(case_list)}
    types, method = merge_failures(found, text_encoder, cfg.merge_threshold, order, cfg.examples)
    parsed = sum(1 for a in final.values() if a.ok)
    failed = len(prompts) - parsed
    if failed:
        (log.error if failed == len(prompts) else log.warning)(
            "%s: %d of %d answers could not be parsed or fetched (reasons in llm_raw.jsonl)", STAGE, failed, len(prompts))
    reasons = sorted({a.reason or "" for a in final.values() if not a.ok})
    failures = Failures(
        cfg.backend, types,
        # failed: there were prompts and not one answer parsed; the reason says why
        status="failed" if prompts and not parsed else "done",
        reason=f"every one of the {len(prompts)} prompts failed: {'; '.join(reasons)[:1000]}"
        if prompts and not parsed else None,
        prompts=len(prompts), parsed=parsed, failed=failed, retried=sum(1 for a in attempts if a.attempt > 0),
        facts={"model": cfg.model, "cases": len(case_list), "truncated": [c for p in prompts for c in p.truncated],
               "token_count": counter.name, "template": template.source, "merge": method,
               "merge_threshold": cfg.merge_threshold, "wall_s": round(time.perf_counter() - started, 3)},
    )
    cfs.write_json_atomic(failures_path, failures.to_json())
    log.info("%s: %d failure types from %d/%d parsed answers (%.1f s)", STAGE, len(types), parsed,
             len(prompts), failures.facts["wall_s"])
    return failures
