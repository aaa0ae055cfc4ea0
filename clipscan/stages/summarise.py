"""Failure cases (``cases.parquet`` rows) in, canonical failure types out (``failures.json``, ``llm_raw.jsonl``).

DAF step 5 (section 3.1.4 and Figure 2 of "Unveiling Glitches"): the cases are packed
into prompts of the paper's format under a token budget, a local LLM names the failure
types of each prompt, and the types of all prompts are merged into canonical ones.

The pieces are plain functions that run and are tested without Ray or a model:

- ``load_template`` / ``render_prompt`` / ``pack_cases``: the prompt text. Captions are
  untrusted, so each case is one JSON-encoded line inside a fenced block whose marker is
  derived from the block's own content and checked not to occur in it; a caption can
  neither end the block nor add a line of its own.
- ``parse_answer``: the answer text to ``[{"type", "description"}]``. The schema-bound
  shape ``{"failures": [...]}``, a bare list, the paper's ``{"Heading": "Description"}``
  dict, code fences and surrounding prose are accepted; anything else is a reason string.
- ``merge_failures``: normalised headings, then a greedy cosine clustering of
  heading+description embeddings from the probe's text encoder.

The backends are the wiring: ``openai`` (any OpenAI-compatible server, a thread pool of
``llm.concurrency`` HTTP requests with timeouts and exponential backoff) and ``vllm``
(the Ray Data LLM processor, one engine per GPU by default). Both constrain the answer
with ``FAILURES_SCHEMA``. An answer that does not parse is kept raw in ``llm_raw.jsonl``,
retried once and counted; it never stops the job.
"""

from __future__ import annotations

import ast
import dataclasses
import hashlib
import http.client
import json
import logging
import math
import re
import time
import unicodedata
import urllib.error
import urllib.request
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor, as_completed
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa

from clipscan import fs as cfs
from clipscan.config import LlmConfig

log = logging.getLogger("clipscan")

STAGE = "summarise"
REQUIRED_COLUMNS = ("id", "texts")
CASES_PLACEHOLDER = "{{cases}}"
DEFAULT_TEMPLATE = Path(__file__).resolve().parents[2] / "configs" / "prompts" / "daf.txt"

MAX_TYPE_CHARS = 120  # a heading longer than this is cut (report rows stay readable)
MAX_DESCRIPTION_CHARS = 500
MAX_ITEMS = 16  # failure types per answer
# A greedy decode repeats the same answer; the one retry of an unparseable answer samples.
RETRY_TEMPERATURE = 0.7
CHARS_PER_TOKEN = 4
CHAT_OVERHEAD_TOKENS = 16  # role markers of an unknown chat template, for the chars/4 estimate
MIN_CAPTION_CHARS = 16  # an over-long case's captions are cut to no less than this
RETRYABLE_HTTP = frozenset({408, 409, 425, 429, 500, 502, 503, 504})

FAILURES_SCHEMA: dict[str, Any] = {
    "type": "object",
    "properties": {
        "failures": {
            "type": "array",
            "items": {
                "type": "object",
                "properties": {
                    "type": {"type": "string", "minLength": 1, "maxLength": MAX_TYPE_CHARS},
                    "description": {"type": "string", "maxLength": MAX_DESCRIPTION_CHARS},
                },
                "required": ["type", "description"],
                "additionalProperties": False,
            },
            "maxItems": MAX_ITEMS,
        }
    },
    "required": ["failures"],
    "additionalProperties": False,
}

# Words that say nothing about which failure a heading names.
STOP_WORDS = frozenset(
    "a an the of in on at to for and or with by from as is are be its it their into between "
    "vs versus about over under than failure failures type types error errors issue issues "
    "problem problems mistake mistakes".split()
)


# --------------------------------------------------------------------------- cases and prompts


@dataclasses.dataclass(frozen=True)
class Case:
    """One failure case: the image id and its captions (own caption first, then probe-only neighbours')."""

    id: str
    captions: tuple[str, ...]


@dataclasses.dataclass(frozen=True)
class Prompt:
    """One packed prompt: its text, the ids of its cases, its token count, the ids of cut cases."""

    index: int
    text: str
    case_ids: tuple[str, ...]
    tokens: int
    truncated: tuple[str, ...] = ()


def cases_from_table(cases: pa.Table) -> list[Case]:
    """``cases.parquet`` rows (``id``, ``texts``; ``caption`` if ``texts`` is empty) in table order."""
    missing = [c for c in REQUIRED_COLUMNS if c not in cases.column_names]
    if missing:
        raise ValueError(
            f"{STAGE}: cases table lacks columns {missing}; present: {cases.column_names}"
        )
    ids = [str(x) for x in cases.column("id").to_pylist()]
    texts = cases.column("texts").to_pylist()
    captions = cases.column("caption").to_pylist() if "caption" in cases.column_names else [None] * len(ids)
    out = []
    for id_, row_texts, caption in zip(ids, texts, captions, strict=True):
        row = [("" if t is None else str(t)) for t in (row_texts or [])]
        if not row:
            row = ["" if caption is None else str(caption)]
        out.append(Case(id_, tuple(row)))
    return out


class PromptTemplate:
    """A prompt template: text with one ``{{cases}}`` line, where the fenced cases block goes."""

    def __init__(self, text: str, source: str = "<string>") -> None:
        if text.count(CASES_PLACEHOLDER) != 1:
            raise ValueError(
                f"{STAGE}: prompt template {source} must hold {CASES_PLACEHOLDER} exactly once "
                f"(found {text.count(CASES_PLACEHOLDER)})"
            )
        self.text = text
        self.source = source
        self.head, self.tail = text.split(CASES_PLACEHOLDER)

    def render(self, block: str) -> str:
        return self.head + block + self.tail


def load_template(path: str | None = None) -> PromptTemplate:
    """The template at ``path`` (local or URI); None = the paper's prompt ``configs/prompts/daf.txt``."""
    if path is None:
        path = str(DEFAULT_TEMPLATE)
    elif not cfs.is_uri(path) and not Path(path).exists() and (DEFAULT_TEMPLATE.parents[2] / path).exists():
        path = str(DEFAULT_TEMPLATE.parents[2] / path)  # a repo-relative path from any working dir
    try:
        text = cfs.read_bytes(path).decode("utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise ValueError(f"{STAGE}: cannot read prompt template {path}: {e}") from e
    return PromptTemplate(text, path)


def case_line(number: int, case: Case) -> str:
    """One case as one line of JSON; every line break a caption may hold is escaped."""
    line = json.dumps({"case": number, "captions": list(case.captions)}, ensure_ascii=False)
    # json escapes control characters below U+0020, not these, which str.splitlines and
    # many tokenizers treat as line breaks.
    for ch in ("\u0085", "\u2028", "\u2029"):
        line = line.replace(ch, f"\\u{ord(ch):04x}")
    return line


def fence_marker(lines: Sequence[str]) -> str:
    """A marker derived from the data only (no randomness) that does not occur in it."""
    data = "\n".join(lines)
    salt = 0
    while True:
        marker = hashlib.sha256(f"{salt}\n{data}".encode()).hexdigest()[:16]
        if marker not in data:
            return marker
        salt += 1


def fence(lines: Sequence[str]) -> str:
    """The fenced cases block: BEGIN line, one JSON line per case, END line."""
    marker = fence_marker(lines)
    return "\n".join([f"----- BEGIN CASES {marker} -----", *lines, f"----- END CASES {marker} -----"])


FENCE_RE = re.compile(r"^----- BEGIN CASES ([0-9a-f]{16}) -----\n(.*?)\n?----- END CASES \1 -----$", re.M | re.S)


def unfence(prompt: str) -> tuple[str, list[dict[str, Any]], str]:
    """Split a rendered prompt into (text before the block, the cases, text after it)."""
    m = FENCE_RE.search(prompt)
    if m is None:
        raise ValueError("no fenced cases block in the prompt")
    body = m.group(2)
    cases = [json.loads(line) for line in body.split("\n")] if body else []
    return prompt[: m.start()], cases, prompt[m.end() :]


def render_prompt(template: PromptTemplate, cases: Sequence[Case], first: int = 1) -> str:
    """The prompt text for ``cases``, numbered from ``first``."""
    return template.render(fence([case_line(first + i, c) for i, c in enumerate(cases)]))


class TokenCounter:
    """Counts the tokens of a prompt as a user chat message.

    With a tokenizer: its exact count, through its chat template when it has one.
    Without: ``ceil(chars / 4)`` plus ``CHAT_OVERHEAD_TOKENS``.
    """

    def __init__(self, tokenizer: Any = None, name: str = f"chars/{CHARS_PER_TOKEN}") -> None:
        self.tokenizer = tokenizer
        self.name = name

    def text(self, s: str) -> int:
        if self.tokenizer is None:
            return math.ceil(len(s) / CHARS_PER_TOKEN)
        return len(self.tokenizer.encode(s, add_special_tokens=False))

    def prompt(self, s: str) -> int:
        if self.tokenizer is None:
            return self.text(s) + CHAT_OVERHEAD_TOKENS
        if getattr(self.tokenizer, "chat_template", None):
            ids = self.tokenizer.apply_chat_template(
                [{"role": "user", "content": s}], tokenize=True, add_generation_prompt=True
            )
            if isinstance(ids, dict) or hasattr(ids, "keys"):  # a BatchEncoding in newer transformers
                ids = ids["input_ids"]
            return len(ids)
        return len(self.tokenizer.encode(s, add_special_tokens=True))


def load_token_counter(source: str | None) -> TokenCounter:
    """The tokenizer of ``source`` (local dir or cached HF id, never downloaded), else chars/4."""
    if not source:
        return TokenCounter()
    try:
        from transformers import AutoTokenizer

        tok = AutoTokenizer.from_pretrained(source, local_files_only=True)
    except Exception as e:  # no transformers, no local copy, or not a tokenizer: estimate
        log.info("%s: no local tokenizer for %s (%s); counting 4 chars a token", STAGE, source,
                 str(e).splitlines()[0] if str(e) else type(e).__name__)
        return TokenCounter()
    return TokenCounter(tok, f"tokenizer:{source}")


def _shorten(case: Case, fits: Callable[[Case], bool]) -> Case:
    """Cut the captions of ``case`` (longest first, then trailing neighbours) until ``fits``."""
    captions = list(case.captions)
    while not fits(Case(case.id, tuple(captions))):
        longest = max(range(len(captions)), key=lambda i: (len(captions[i]), -i))
        if len(captions[longest]) > MIN_CAPTION_CHARS:
            keep = max(MIN_CAPTION_CHARS, int(len(captions[longest]) * 0.75))
            captions[longest] = captions[longest][: keep - 1] + "\u2026"
        elif len(captions) > 1:
            captions.pop()
        else:
            raise ValueError(f"{STAGE}: case {case.id} does not fit the prompt budget even when cut")
    return Case(case.id, tuple(captions))


def pack_cases(
    cases: Sequence[Case],
    template: PromptTemplate,
    max_tokens: int,
    max_cases: int,
    counter: TokenCounter | None = None,
) -> list[Prompt]:
    """Pack ``cases`` in order into prompts of at most ``max_cases`` cases and ``max_tokens`` tokens.

    Every case lands in exactly one prompt; a case that alone exceeds the budget has its
    captions cut and its id recorded in ``Prompt.truncated``. The count of every prompt is
    checked exactly after an additive estimate, so no prompt exceeds the budget.
    """
    counter = counter or TokenCounter()
    base = counter.prompt(render_prompt(template, []))
    if base + 8 > max_tokens:
        raise ValueError(
            f"{STAGE}: llm.max_prompt_tokens={max_tokens} leaves no room for cases: the template "
            f"{template.source} alone takes {base} tokens ({counter.name})"
        )
    prompts: list[Prompt] = []
    i = 0
    while i < len(cases):
        chosen: list[Case] = []
        estimate = base
        while i < len(cases) and len(chosen) < max_cases:
            cost = counter.text(case_line(len(chosen) + 1, cases[i])) + 1
            if chosen and estimate + cost > max_tokens:
                break
            chosen.append(cases[i])
            estimate += cost
            i += 1
        truncated: tuple[str, ...] = ()
        while True:
            text = render_prompt(template, chosen)
            tokens = counter.prompt(text)
            if tokens <= max_tokens:
                break
            if len(chosen) > 1:  # the estimate was optimistic: give the last case back
                chosen.pop()
                i -= 1
                continue
            cut = _shorten(chosen[0], lambda c: counter.prompt(render_prompt(template, [c])) <= max_tokens)
            log.warning("%s: case %s exceeds llm.max_prompt_tokens=%d alone; its captions were cut",
                        STAGE, cut.id, max_tokens)
            chosen, truncated = [cut], (cut.id,)
        prompts.append(Prompt(len(prompts), text, tuple(c.id for c in chosen), tokens, truncated))
    return prompts


# --------------------------------------------------------------------------- answers


def clean_text(text: str, limit: int) -> str:
    """Control and format characters dropped, whitespace collapsed, cut to ``limit`` characters."""
    text = "".join(" " if ch.isspace() else ch for ch in str(text) if ch.isspace() or unicodedata.category(ch)[0] != "C")
    return " ".join(text.split())[:limit]


def _strip_description(text: str) -> str:
    text = clean_text(text, 10 * MAX_DESCRIPTION_CHARS)
    return re.sub(r"^description\s*:\s*", "", text, flags=re.I)[:MAX_DESCRIPTION_CHARS]


def _items(obj: Any) -> tuple[list[dict[str, str]] | None, str | None]:
    if isinstance(obj, dict) and "failures" in obj:
        obj = obj["failures"]
    if isinstance(obj, dict):  # the paper's shape: {"Failure Type Heading": "Description"}
        if not all(isinstance(v, str) for v in obj.values()):
            return None, "a JSON object whose values are not all strings"
        obj = [{"type": k, "description": v} for k, v in obj.items()]
    if not isinstance(obj, list):
        return None, f"expected a list of failure types, got {type(obj).__name__}"
    items: list[dict[str, str]] = []
    for entry in obj:
        if not isinstance(entry, dict):
            continue
        heading = entry.get("type", entry.get("heading", entry.get("name")))
        heading = clean_text(heading, MAX_TYPE_CHARS) if isinstance(heading, str) else ""
        if not heading:
            continue
        description = entry.get("description", "")
        items.append({
            "type": heading,
            "description": _strip_description(description if isinstance(description, str) else ""),
        })
    if obj and not items:
        return None, "no item has a non-empty string 'type'"
    return items, None


_CODE_FENCE = re.compile(r"```[A-Za-z]*\s*\n?(.*?)```", re.S)


def parse_answer(text: str | None) -> tuple[list[dict[str, str]] | None, str | None]:
    """An answer to ``([{"type", "description"}], None)`` or ``(None, reason)``; never raises.

    Accepts ``{"failures": [...]}``, a bare list, the paper's ``{"Heading": "Description"}``
    dict (a Python literal too), inside a code fence or surrounded by prose.
    """
    if text is None or not str(text).strip():
        return None, "empty answer"
    text = str(text).strip()
    m = _CODE_FENCE.search(text)
    if m:
        text = m.group(1).strip()
    obj: Any = None
    # strict=False: raw control characters inside strings, which some grammar backends let
    # through, are kept (and cleaned later) rather than failing the answer.
    decoder = json.JSONDecoder(strict=False)
    try:
        obj = decoder.decode(text)
    except ValueError as e:
        error = f"not JSON: {e}"
        starts = [p for p in (text.find("{"), text.find("[")) if p >= 0]
        if starts:
            try:
                obj, _ = decoder.raw_decode(text[min(starts):])
            except ValueError:
                obj = None
            if obj is None and len(text) < 100_000:
                end = max(text.rfind("}"), text.rfind("]"))
                try:
                    obj = ast.literal_eval(text[min(starts) : end + 1])
                except (ValueError, SyntaxError, MemoryError, RecursionError, TypeError):
                    obj = None
        if obj is None:
            return None, error
    return _items(obj)


# --------------------------------------------------------------------------- merging


def normalise_heading(heading: str) -> str:
    """Case, punctuation, plurals and stop words folded: ``"The Colour Errors!"`` -> ``"colour"``."""
    text = unicodedata.normalize("NFKC", heading).casefold()
    words = re.sub(r"[\W_]+", " ", text).split()
    kept = []
    for w in words:
        if len(w) > 3 and w.endswith("s") and not w.endswith(("ss", "us", "is")):
            w = w[:-1]
        if w not in STOP_WORDS:
            kept.append(w)
    return " ".join(kept) or " ".join(words)


@dataclasses.dataclass(frozen=True)
class Found:
    """One failure type named by one prompt, with the ids of that prompt's cases."""

    prompt: int
    type: str
    description: str
    case_ids: tuple[str, ...]


def merge_failures(
    found: Sequence[Found],
    text_encoder: Callable[[list[str]], np.ndarray] | None,
    threshold: float,
    case_order: dict[str, int] | None = None,
    examples: int = 8,
) -> tuple[list[dict[str, Any]], str]:
    """Canonical failure types from the types of all prompts; returns ``(types, method)``.

    Types with the same normalised heading form a group; groups are then visited by
    prompts (desc) and first appearance, and each joins the first-made cluster whose
    leader's "heading: description" embedding has cosine >= ``threshold`` with its own
    (greedy, deterministic), else it leads a new cluster. ``text_encoder`` maps texts to
    (n, d) float32 L2-normalised embeddings; None (or an encoder that fails) merges by
    normalised heading only. ``prompts``/``cases`` count the distinct prompts naming a
    type and the cases of those prompts; ``examples`` are their ids in ``case_order``.
    """
    groups: dict[str, list[Found]] = {}
    first_seen: dict[str, int] = {}
    for i, f in enumerate(found):
        key = normalise_heading(f.type)
        groups.setdefault(key, []).append(f)
        first_seen.setdefault(key, i)
    order = sorted(groups, key=lambda k: (-len({f.prompt for f in groups[k]}), first_seen[k]))

    leaders: list[int] = []
    cluster_of = list(range(len(order)))
    method = "heading"
    if text_encoder is not None and len(order) > 1:
        texts = [f"{groups[k][0].type}: {groups[k][0].description}" for k in order]
        try:
            emb = np.asarray(text_encoder(texts), dtype=np.float32)
            if emb.shape[0] != len(texts) or emb.ndim != 2:
                raise ValueError(f"text encoder returned shape {emb.shape} for {len(texts)} texts")
            emb = emb / np.maximum(np.linalg.norm(emb, axis=1, keepdims=True), 1e-12)
            method = "embedding"
        except Exception as e:  # the merge still works by heading; say why in the log
            log.warning("%s: text encoder failed (%s); merging failure types by heading only", STAGE, e)
            emb = None
        if emb is not None:
            for g in range(len(order)):
                if leaders:
                    sims = emb[leaders] @ emb[g]
                    best = int(np.argmax(sims))
                    if float(sims[best]) >= threshold:
                        cluster_of[g] = leaders[best]
                        continue
                leaders.append(g)
    members: dict[int, list[Found]] = {}
    for g, key in enumerate(order):
        members.setdefault(cluster_of[g], []).extend(groups[key])

    rank = case_order or {}
    merged = []
    for leader, items in members.items():
        lead = groups[order[leader]][0]
        prompts = sorted({f.prompt for f in items})
        case_ids = {c for f in items for c in f.case_ids}
        ranked = sorted(case_ids, key=lambda c: (rank.get(c, len(rank)), c))
        variants = sorted({f.type for f in items} - {lead.type})
        merged.append((len(prompts), len(case_ids), lead, ranked[:examples], variants, prompts))
    merged.sort(key=lambda m: (-m[0], -m[1], m[2].type.casefold(), m[2].type))
    types = [
        {"type": lead.type, "description": lead.description, "prompts": n_prompts, "cases": n_cases,
         "examples": ex, "variants": variants, "prompt_ids": prompts}
        for n_prompts, n_cases, lead, ex, variants, prompts in merged
    ]
    return types, method


# --------------------------------------------------------------------------- backends


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

    def parse(self) -> Attempt:
        if self.error is not None:
            self.items, self.reason = None, self.error
        else:
            self.items, self.reason = parse_answer(self.answer)
            if self.items is None and self.finish_reason == "length":
                self.reason = f"{self.reason} (answer cut at llm.max_tokens)"
        return self

    @property
    def ok(self) -> bool:
        return self.items is not None


class RequestError(RuntimeError):
    """An HTTP request that failed for good (after its retries)."""


def response_format() -> dict[str, Any]:
    """The OpenAI ``response_format`` that binds an answer to ``FAILURES_SCHEMA`` (vLLM, llama.cpp, Ollama...)."""
    return {"type": "json_schema", "json_schema": {"name": "failure_types", "schema": FAILURES_SCHEMA, "strict": True}}


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


def chat_body(cfg: LlmConfig, text: str, temperature: float) -> dict[str, Any]:
    """The chat-completions request for one prompt, bound to ``FAILURES_SCHEMA``."""
    return {
        "model": cfg.model,
        "messages": [{"role": "user", "content": text}],
        "max_tokens": cfg.max_tokens,
        "temperature": temperature,
        "response_format": response_format(),
        **cfg.extra_body,
    }


def _openai_attempt(cfg: LlmConfig, prompt: Prompt, attempt: int, headers: dict[str, str]) -> Attempt:
    temperature = cfg.temperature if attempt == 0 else max(cfg.temperature, RETRY_TEMPERATURE)
    url = cfg.url.rstrip("/") + "/chat/completions"
    start = time.perf_counter()
    result = Attempt(prompt.index, attempt)
    try:
        resp = post_json(url, chat_body(cfg, prompt.text, temperature), cfg.timeout_s, cfg.retries,
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
    return result.parse()


def _openai_prompt(cfg: LlmConfig, prompt: Prompt, headers: dict[str, str]) -> list[Attempt]:
    first = _openai_attempt(cfg, prompt, 0, headers)
    if first.ok or first.error is not None and first.error.startswith("request failed"):
        return [first]  # transport failures already had their retries with backoff
    return [first, _openai_attempt(cfg, prompt, 1, headers)]


def run_openai(prompts: Sequence[Prompt], cfg: LlmConfig) -> list[Attempt]:
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
        futures = {pool.submit(_openai_prompt, cfg, p, headers): p.index for p in prompts}
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
    """``vLLMEngineProcessorConfig`` fields: one engine per GPU by default, one CPU engine without GPUs."""
    kwargs: dict[str, Any] = {
        "model_source": cfg.model,
        "engine_kwargs": dict(cfg.engine_kwargs),
        "concurrency": cfg.replicas or max(1, gpus),
        "batch_size": 16,
        "should_continue_on_error": True,
    }
    if gpus == 0:
        kwargs["placement_group_config"] = {"bundles": [{"CPU": 1}]}
        kwargs["log_engine_metrics"] = False
    kwargs.update(cfg.processor_kwargs)
    return kwargs


def run_vllm(prompts: Sequence[Prompt], cfg: LlmConfig) -> list[Attempt]:
    """Answer every prompt with the Ray Data LLM processor; unparseable answers get one more pass."""
    import ray
    from ray.data.llm import build_processor, vLLMEngineProcessorConfig

    if not ray.is_initialized():
        ray.init()
    gpus = int(ray.cluster_resources().get("GPU", 0))
    config = vLLMEngineProcessorConfig(**vllm_processor_kwargs(cfg, gpus))
    processor = build_processor(
        config, preprocess=partial(_vllm_preprocess, max_tokens=cfg.max_tokens, schema=json.dumps(FAILURES_SCHEMA))
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
            ).parse())
        seen = {(a.prompt, a.attempt) for a in out}
        for p, a in todo:  # a row the processor lost is a recorded failure, not a silent gap
            if (p.index, a) not in seen:
                out.append(Attempt(p.index, a, error="engine returned no row for this prompt").parse())
        return out

    first = generate([(p, 0) for p in prompts])
    by_index = {p.index: p for p in prompts}
    again = [(by_index[a.prompt], 1) for a in first if not a.ok]
    second = generate(again) if again else []
    return sorted(first + second, key=lambda a: (a.prompt, a.attempt))


# --------------------------------------------------------------------------- the stage


def summarise(
    cases: pa.Table,
    cfg: LlmConfig,
    text_encoder: Callable[[list[str]], np.ndarray] | None,
    out_dir: str,
) -> dict[str, Any]:
    """Name and merge the failure types of ``cases``; writes ``failures.json`` and ``llm_raw.jsonl``.

    ``text_encoder``: texts -> (n, d) float32 L2-normalised (the probe's), used to merge
    failure types; None merges by normalised heading only. Returns the failures dict.
    Answers that do not parse are recorded and counted; no answer makes this raise.
    """
    failures_path = cfs.join(out_dir, "failures.json")
    if cfg.backend == "off":
        failures: dict[str, Any] = {"backend": "off", "types": []}
        cfs.write_json_atomic(failures_path, failures)
        return failures

    started = time.perf_counter()
    case_list = cases_from_table(cases)
    template = load_template(cfg.prompt)
    counter = load_token_counter(cfg.tokenizer or cfg.model)
    prompts = pack_cases(case_list, template, cfg.max_prompt_tokens, cfg.cases_per_prompt, counter)
    log.info("%s: %d cases in %d prompts (%s, budget %d tokens), backend %s", STAGE, len(case_list),
             len(prompts), counter.name, cfg.max_prompt_tokens, cfg.backend)

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
    failures = {
        "backend": cfg.backend,
        "model": cfg.model,
        "prompts": len(prompts),
        "parsed": parsed,
        "failed": failed,
        "retried": sum(1 for a in attempts if a.attempt > 0),
        "cases": len(case_list),
        "truncated": [c for p in prompts for c in p.truncated],
        "token_count": counter.name,
        "template": template.source,
        "merge": method,
        "merge_threshold": cfg.merge_threshold,
        "wall_s": round(time.perf_counter() - started, 3),
        "types": types,
    }
    cfs.write_json_atomic(failures_path, failures)
    log.info("%s: %d failure types from %d/%d parsed answers (%.1f s)", STAGE, len(types), parsed,
             len(prompts), failures["wall_s"])
    return failures
