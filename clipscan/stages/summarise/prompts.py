"""Failure cases in; prompts out: the paper's template, fenced JSON case lines, packed under a token budget.

Captions are untrusted, so each case is one JSON-encoded line inside a fenced block whose
marker is derived from the block's own content and checked not to occur in it; a caption
can neither end the block nor add a line of its own.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import math
import re
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import pyarrow as pa

from clipscan import fs as cfs
from clipscan.columns import require

log = logging.getLogger("clipscan")

STAGE = "summarise"
REQUIRED_COLUMNS = ("id", "texts")
CASES_PLACEHOLDER = "{{cases}}"
DEFAULT_TEMPLATE = Path(__file__).resolve().parents[3] / "configs" / "prompts" / "daf.txt"
CHARS_PER_TOKEN = 4
CHAT_OVERHEAD_TOKENS = 16  # role markers of an unknown chat template, for the chars/4 estimate
MIN_CAPTION_CHARS = 16  # an over-long case's captions are cut to no less than this



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
    require(cases, REQUIRED_COLUMNS, STAGE)
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

