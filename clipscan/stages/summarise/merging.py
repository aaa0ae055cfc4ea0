"""Failure types of every prompt in; canonical failure types with counts and example images out.

Headings are normalised (case, punctuation, plurals, stop words), then groups are merged
by a greedy cosine clustering of heading+description embeddings from the probe's text
encoder.
"""

from __future__ import annotations

import dataclasses
import logging
import re
import unicodedata
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from clipscan.stages.summarise.prompts import STAGE

log = logging.getLogger("clipscan")

STOP_WORDS = frozenset(
    "a an the of in on at to for and or with by from as is are be its it their into between "
    "vs versus about over under than failure failures type types error errors issue issues "
    "problem problems mistake mistakes".split()
)



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

