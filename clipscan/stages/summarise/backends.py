"""Prompts in; raw answers (``Attempt``) out, from an OpenAI-compatible server or Ray Data LLM's vLLM processor.

``openai``: a thread pool of ``llm.concurrency`` HTTP requests with timeouts and
exponential backoff (urllib: the ``openai`` client is not a dependency). ``vllm``: the Ray
Data LLM processor. Both constrain the answer with ``FAILURES_SCHEMA``; an answer that does
not parse gets one more try at a higher temperature.
"""

from __future__ import annotations

import dataclasses
import http.client
import json
import logging
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor, as_completed
from functools import partial
from typing import Any

from clipscan.config import LlmConfig
from clipscan.stages.summarise.parsing import FAILURES_SCHEMA, parse_answer
from clipscan.stages.summarise.prompts import STAGE, Prompt

log = logging.getLogger("clipscan")

Parser = Callable[[str | None], tuple[list[dict[str, str]] | None, str | None]]


@dataclasses.dataclass(frozen=True)
class AnswerKind:
    """What a request asks for: the schema that binds the answer, and the parser of its text."""

    name: str
    schema: dict[str, Any]
    parse: Parser


FAILURE_TYPES = AnswerKind("failure_types", FAILURES_SCHEMA, parse_answer)

# A greedy decode repeats the same answer; the one retry of an unparseable answer samples.
RETRY_TEMPERATURE = 0.7
RETRYABLE_HTTP = frozenset({408, 409, 425, 429, 500, 502, 503, 504})



@dataclasses.dataclass
class Attempt:
    """One request for one prompt: the raw answer or the error, and what parsing made of it."""

    prompt: int
    attempt: int
    answer: str | None = None
    error: str | None = None
    finish_reason: str | None = None
    usage: dict[str, Any] | None = None
    elapsed_s: float = 0.0
    items: list[dict[str, str]] | None = None
    reason: str | None = None

    def parse(self, parser: Parser = parse_answer) -> Attempt:
        if self.error is not None:
            self.items, self.reason = None, self.error
        else:
            self.items, self.reason = parser(self.answer)
            if self.items is None and self.finish_reason == "length":
                self.reason = f"{self.reason} (answer cut at llm.max_tokens)"
        return self

    @property
    def ok(self) -> bool:
        return self.items is not None


class RequestError(RuntimeError):
    """An HTTP request that failed for good (after its retries)."""


def response_format(kind: AnswerKind = FAILURE_TYPES) -> dict[str, Any]:
    """The OpenAI ``response_format`` that binds an answer to ``kind``'s schema (vLLM, llama.cpp, Ollama...)."""
    return {"type": "json_schema", "json_schema": {"name": kind.name, "schema": kind.schema, "strict": True}}


def post_json(
    url: str,
    body: dict[str, Any],
    timeout_s: float,
    retries: int,
    backoff_s: float,
    headers: dict[str, str] | None = None,
    sleep: Callable[[float], None] = time.sleep,
) -> dict[str, Any]:
    """POST ``body`` as JSON; retry timeouts, connection errors and 408/429/5xx with exponential backoff.

    The n-th retry waits ``backoff_s * 2**(n-1)`` s (or the server's Retry-After, capped at
    60 s, when longer). Raises ``RequestError`` naming the URL once the retries are spent.
    """
    data = json.dumps(body).encode()
    hdrs = {"Content-Type": "application/json", **(headers or {})}
    last = ""
    for attempt in range(retries + 1):
        wait = backoff_s * 2**attempt
        try:
            req = urllib.request.Request(url, data=data, headers=hdrs, method="POST")
            with urllib.request.urlopen(req, timeout=timeout_s) as resp:
                payload = resp.read()
            try:
                return json.loads(payload)
            except ValueError as e:
                last = f"response is not JSON: {e}: {payload[:200]!r}"
        except urllib.error.HTTPError as e:
            detail = e.read()[:300].decode("utf-8", "replace") if e.fp is not None else ""
            last = f"HTTP {e.code}: {detail}"
            if e.code not in RETRYABLE_HTTP:
                raise RequestError(f"{url}: {last}") from e
            retry_after = e.headers.get("Retry-After") if e.headers else None
            if retry_after and retry_after.strip().isdigit():
                wait = max(wait, min(60.0, float(retry_after)))
        except (OSError, http.client.HTTPException) as e:  # URLError, timeouts, resets
            last = f"{type(e).__name__}: {getattr(e, 'reason', e)}"
        if attempt < retries:
            log.debug("%s: %s failed (%s); retry %d in %.2f s", STAGE, url, last, attempt + 1, wait)
            sleep(wait)
    raise RequestError(f"{url}: {last} (after {retries + 1} attempts)")


def chat_body(cfg: LlmConfig, text: str, temperature: float, kind: AnswerKind = FAILURE_TYPES) -> dict[str, Any]:
    """The chat-completions request for one prompt, bound to ``kind``'s schema."""
    return {
        "model": cfg.model,
        "messages": [{"role": "user", "content": text}],
        "max_tokens": cfg.max_tokens,
        "temperature": temperature,
        "response_format": response_format(kind),
        **cfg.extra_body,
    }


def _openai_attempt(cfg: LlmConfig, prompt: Prompt, attempt: int, headers: dict[str, str],
                    kind: AnswerKind = FAILURE_TYPES) -> Attempt:
    temperature = cfg.temperature if attempt == 0 else max(cfg.temperature, RETRY_TEMPERATURE)
    url = cfg.url.rstrip("/") + "/chat/completions"
    start = time.perf_counter()
    result = Attempt(prompt.index, attempt)
    try:
        resp = post_json(url, chat_body(cfg, prompt.text, temperature, kind), cfg.timeout_s, cfg.retries,
                         cfg.backoff_s, headers)
        choice = (resp.get("choices") or [{}])[0]
        result.answer = (choice.get("message") or {}).get("content")
        result.finish_reason = choice.get("finish_reason")
        result.usage = resp.get("usage")
        if result.answer is None:
            result.error = f"response has no message content: {json.dumps(resp)[:300]}"
    except RequestError as e:
        result.error = f"request failed: {e}"
    except Exception as e:  # a malformed response must not stop the other prompts
        result.error = f"{type(e).__name__}: {e}"
    result.elapsed_s = round(time.perf_counter() - start, 3)
    return result.parse(kind.parse)


def _openai_prompt(cfg: LlmConfig, prompt: Prompt, headers: dict[str, str],
                   kind: AnswerKind = FAILURE_TYPES) -> list[Attempt]:
    first = _openai_attempt(cfg, prompt, 0, headers, kind)
    if first.ok or first.error is not None and first.error.startswith("request failed"):
        return [first]  # transport failures already had their retries with backoff
    return [first, _openai_attempt(cfg, prompt, 1, headers, kind)]


def run_openai(prompts: Sequence[Prompt], cfg: LlmConfig, kind: AnswerKind = FAILURE_TYPES) -> list[Attempt]:
    """Ask ``cfg.url`` for every prompt, ``cfg.concurrency`` requests in flight; attempts in prompt order.

    HTTP-bound work: the server batches, so a thread pool in the driver is all the
    parallelism needed. An API key is read from ``OPENAI_API_KEY`` when set.
    """
    import os

    headers = {}
    if os.environ.get("OPENAI_API_KEY"):
        headers["Authorization"] = f"Bearer {os.environ['OPENAI_API_KEY']}"
    attempts: dict[int, list[Attempt]] = {}
    started = time.perf_counter()
    with ThreadPoolExecutor(max_workers=max(1, min(cfg.concurrency, len(prompts)))) as pool:
        futures = {pool.submit(_openai_prompt, cfg, p, headers, kind): p.index for p in prompts}
        for done, fut in enumerate(as_completed(futures), 1):
            attempts[futures[fut]] = fut.result()
            if done == len(prompts) or done % max(1, len(prompts) // 10) == 0:
                log.info("%s: %d/%d prompts answered (%.1f s)", STAGE, done, len(prompts),
                         time.perf_counter() - started)
    return [a for i in sorted(attempts) for a in attempts[i]]


def _vllm_preprocess(row: dict[str, Any], max_tokens: int, schema: str) -> dict[str, Any]:
    return {
        "prompt_index": row["prompt_index"],
        "attempt": row["attempt"],
        "messages": [{"role": "user", "content": row["text"]}],
        "sampling_params": {
            "temperature": float(row["temperature"]),
            "max_tokens": max_tokens,
            # The schema travels as a string: a nested dict column would be typed by Arrow.
            "structured_outputs": {"json": schema},
        },
    }


def vllm_processor_kwargs(cfg: LlmConfig, gpus: int) -> dict[str, Any]:
    """``vLLMEngineProcessorConfig`` fields: as many engines as ``gpus`` hold, each taking
    tensor_parallel_size x pipeline_parallel_size GPUs (``llm.engine_kwargs``), or
    ``llm.replicas``; one CPU engine without GPUs. Raises naming the sizes when the GPUs
    cannot hold one engine."""
    engine = dict(cfg.engine_kwargs)
    per_engine = int(engine.get("tensor_parallel_size", 1)) * int(engine.get("pipeline_parallel_size", 1))
    if gpus and gpus < per_engine:
        raise ValueError(
            f"{STAGE}: one vLLM engine needs {per_engine} GPUs (tensor_parallel_size x pipeline_parallel_size "
            f"in llm.engine_kwargs) but the cluster has or can add {gpus}"
        )
    kwargs: dict[str, Any] = {
        "model_source": cfg.model,
        "engine_kwargs": engine,
        "concurrency": cfg.replicas or max(1, gpus // per_engine),
        "batch_size": 16,
        "should_continue_on_error": True,
    }
    if gpus == 0:
        kwargs["placement_group_config"] = {"bundles": [{"CPU": 1}]}
        kwargs["log_engine_metrics"] = False
    kwargs.update(cfg.processor_kwargs)
    return kwargs


def run_vllm(prompts: Sequence[Prompt], cfg: LlmConfig, kind: AnswerKind = FAILURE_TYPES) -> list[Attempt]:
    """Answer every prompt with the Ray Data LLM processor; unparseable answers get one more pass."""
    import ray
    from ray.data.llm import build_processor, vLLMEngineProcessorConfig

    from clipscan.stages.rows import cluster_resources

    if not ray.is_initialized():
        ray.init()
    gpus = int(cluster_resources().get("GPU", 0))  # with GPU workers at zero nodes: what the autoscaler can add
    config = vLLMEngineProcessorConfig(**vllm_processor_kwargs(cfg, gpus))
    processor = build_processor(
        config, preprocess=partial(_vllm_preprocess, max_tokens=cfg.max_tokens, schema=json.dumps(kind.schema))
    )

    def generate(todo: list[tuple[Prompt, int]]) -> list[Attempt]:
        items = [
            {"prompt_index": p.index, "attempt": a, "text": p.text,
             "temperature": cfg.temperature if a == 0 else max(cfg.temperature, RETRY_TEMPERATURE)}
            for p, a in todo
        ]
        start = time.perf_counter()
        rows = processor(ray.data.from_items(items)).take_all()
        elapsed = round(time.perf_counter() - start, 3)
        out = []
        for row in rows:
            error = row.get("__inference_error__") or None
            generated = int(row.get("num_generated_tokens") or 0)
            out.append(Attempt(
                prompt=int(row["prompt_index"]), attempt=int(row["attempt"]),
                answer=None if error else row.get("generated_text"),
                error=f"engine error: {error}" if error else None,
                # the processor drops vLLM's finish reason; a full budget means it was cut
                finish_reason=None if error else ("length" if generated >= cfg.max_tokens else "stop"),
                usage={"prompt_tokens": row.get("num_input_tokens"), "completion_tokens": generated},
                elapsed_s=elapsed,
            ).parse(kind.parse))
        seen = {(a.prompt, a.attempt) for a in out}
        for p, a in todo:  # a row the processor lost is a recorded failure, not a silent gap
            if (p.index, a) not in seen:
                out.append(Attempt(p.index, a, error="engine returned no row for this prompt").parse(kind.parse))
        return out

    first = generate([(p, 0) for p in prompts])
    by_index = {p.index: p for p in prompts}
    again = [(by_index[a.prompt], 1) for a in first if not a.ok]
    second = generate(again) if again else []
    return sorted(first + second, key=lambda a: (a.prompt, a.attempt))

