"""Caption pairs in (a case's caption with its probe-only neighbours' and with controls'); per-attribute lift out.

Which kinds of difference does the probe fail to see? For every mined case, its caption is
compared with the captions of its probe-only neighbours (the pairs the probe calls alike and
the reference does not) and with control pairs: by default (``rank_matched``) the case's
reference neighbours at the probe-only neighbours' reference ranks, so the controls are as
far from the image, to the reference, as the probe-only ones (the case's reference top-k
would be a biased control: a probe that sees everything, plus noise, gets probe-only
neighbours that are the reference's near misses and would show lifts above 1); also
counted, the reference top-k and a seeded sample of pairs both models agree on, at the
probe similarity of the probe-only pairs. Each caption is reduced, per attribute, to the
set of that attribute's lexicon words it uses; two captions differ in an attribute word when
only one of them uses it. Per attribute: the share of differing words among probe-only
pairs (rate), the same among controls (control_rate), their ratio (lift) with a 95 %
interval (Katz's log method; words and pairs are treated as independent, so the interval is
narrower than it should be when a case contributes many pairs). Words rather than whole
pairs are counted because two captions of a rich corpus almost always differ somewhere in
an attribute such as colour, which would leave every rate near 1.

``AttributeCounts`` is the batch stage (rows in, one row of counts out), ``Counts`` folds them,
``Counts.summary`` gives ``attributes.json``; ``build_rows`` builds the input rows from
the mine stage's top cases, ``matched_pairs_parts`` samples the agreeing pairs from the
discrepancy parts; ``count_dataset`` is the thin Ray Data wiring.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from clipscan.columns import require
from clipscan.stages.discrepancy import hash_ids
from clipscan.stages.discrepancy import uniform as dc_uniform
from clipscan.stats import lift_ci

ATTRIBUTES: tuple[str, ...] = ("colour", "count", "size", "position", "object", "action", "scene")
LEXICON_DIR = Path(__file__).resolve().parents[1] / "data" / "lexicons"
GROUPS = ("probe_only", "reference", "matched", "rank_matched")  # probe-only pairs, then the controls
# Which groups the lift compares against, per ``attributes.control``.
CONTROLS: dict[str, tuple[int, ...]] = {"rank_matched": (3,), "reference": (1,), "matched": (2,), "pooled": (1, 2)}

ROWS_SCHEMA = pa.schema(
    [
        ("rank", pa.int64()),  # the case's rank (1 = most discrepant); examples keep the best
        ("id", pa.string()),
        ("caption", pa.string()),
        ("neighbour_ids", pa.list_(pa.string())),  # probe-only neighbours
        ("neighbour_captions", pa.list_(pa.string())),
        ("reference_captions", pa.list_(pa.string())),  # control: the case's reference neighbours
        ("matched_captions", pa.list_(pa.string())),  # control: agreeing pairs at matched probe cosine
        ("rank_matched_captions", pa.list_(pa.string())),  # control: reference neighbours at the probe-only ones' reference ranks
    ]
)

_TOKEN = re.compile(r"[a-z]+(?:-[a-z]+)*")


class LexiconError(ValueError):
    """A lexicon file that cannot be read; the message names the attribute and the path."""


@dataclass(frozen=True)
class Lexicons:
    """Attribute name -> its words (lower case). ``sources`` names the file each came from."""

    words: Mapping[str, frozenset[str]]
    sources: Mapping[str, str] = field(default_factory=dict)

    @property
    def names(self) -> tuple[str, ...]:
        return tuple(self.words)

    def describe(self, caption: str | None) -> tuple[frozenset[str], ...]:
        """Per attribute (in ``names`` order), the set of its words the caption uses.

        A word also matches its lexicon entry without a plural "s"/"es". ``count`` also
        holds how many object words the caption uses and whether one is plural, so "a dog"
        and "two dogs", or "a circle and a square" and "a circle", differ in count.
        """
        tokens = _TOKEN.findall((caption or "").lower())
        objects = self.words.get("object", frozenset())
        out = []
        for name, words in self.words.items():
            found = {w for t in tokens for w in _forms(t) if w in words}
            if name == "count":
                mentions = [t for t in tokens if any(w in objects for w in _forms(t))]
                found.add(f"#objects={len(mentions)}")
                if any(t not in objects for t in mentions):
                    found.add("#plural")
            out.append(frozenset(found))
        return tuple(out)


def _forms(token: str) -> tuple[str, ...]:
    if token.endswith("es") and len(token) > 3:
        return (token, token[:-1], token[:-2])
    if token.endswith("s") and len(token) > 2:
        return (token, token[:-1])
    return (token,)


def read_lexicon(path: str | Path, name: str) -> frozenset[str]:
    """One word a line, ``#`` starts a comment; lower-cased. Raises ``LexiconError`` naming the file."""
    try:
        text = Path(path).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise LexiconError(f"attribute {name!r}: cannot read lexicon {path}: {e}") from e
    words = frozenset(
        w.lower() for line in text.splitlines() if (w := line.split("#", 1)[0].strip())
    )
    if not words:
        raise LexiconError(f"attribute {name!r}: lexicon {path} has no words")
    return words


def load_lexicons(
    names: Sequence[str] = ATTRIBUTES, overrides: Mapping[str, str] | None = None
) -> Lexicons:
    """The shipped lexicons (``clipscan/data/lexicons/NAME.txt``) for ``names``, with
    ``overrides`` (attribute -> file) replacing or adding files. An unknown name without a
    file fails and names the shipped ones."""
    overrides = dict(overrides or {})
    words, sources = {}, {}
    for name in names:
        given = overrides.pop(name, None)
        path = Path(given) if given else LEXICON_DIR / f"{name}.txt"
        if not path.is_file():
            shipped = sorted(p.stem for p in LEXICON_DIR.glob("*.txt"))
            raise LexiconError(
                f"attribute {name!r}: no lexicon file {path} (shipped: {shipped}; "
                "give one with attributes.lexicons)"
            )
        words[name] = read_lexicon(path, name)
        sources[name] = str(path) if given else f"shipped:{name}.txt"
    if overrides:
        raise LexiconError(
            f"attributes.lexicons names {sorted(overrides)}, which are not in attributes.names {list(names)}"
        )
    return Lexicons(words, sources)


# ---------------------------------------------------------------------------------------
# Counting


# Per group and attribute: attribute words compared (the union of the two captions' sets,
# summed over pairs), of them used by one caption only, pairs where either caption uses the
# attribute, and of them pairs whose sets differ.
MEASURES = ("words", "differ_words", "pairs", "differ_pairs")


@dataclass
class Counts:
    """``table[g, m, a]``: measure ``m`` (``MEASURES``) of attribute ``a`` in group ``g``
    (``GROUPS``); ``pairs[g]`` pairs compared; up to ``keep`` example cases per attribute,
    (rank, id), best rank first, where a probe-only pair differs in it."""

    names: tuple[str, ...]
    keep: int = 8
    pairs: np.ndarray = field(default_factory=lambda: np.zeros(len(GROUPS), dtype=np.int64))
    table: np.ndarray = field(default_factory=lambda: np.zeros((0, 0, 0), dtype=np.int64))
    examples: dict[str, list[tuple[int, str]]] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.table.size == 0:
            self.table = np.zeros((len(GROUPS), len(MEASURES), len(self.names)), dtype=np.int64)
        for name in self.names:
            self.examples.setdefault(name, [])

    def add(self, other: Counts) -> None:
        if other.names != self.names:
            raise ValueError(f"Counts.add: attributes {other.names} differ from {self.names}")
        self.pairs += other.pairs
        self.table += other.table
        for name in self.names:
            merged = sorted(set(self.examples[name]) | set(other.examples[name]))
            self.examples[name] = merged[: self.keep]

    def to_row(self) -> dict[str, Any]:
        """One row of Arrow-ready columns (lists of length 1), as a batch stage returns it."""
        return {
            "pairs": [self.pairs.tolist()],
            "table": [self.table.reshape(-1).tolist()],
            "examples": [json.dumps({k: [[r, i] for r, i in v] for k, v in self.examples.items()})],
        }

    @classmethod
    def from_row(cls, row: Mapping[str, Any], names: tuple[str, ...], keep: int = 8) -> Counts:
        examples = {k: [(int(r), str(i)) for r, i in v] for k, v in json.loads(row["examples"]).items()}
        table = np.asarray(row["table"], dtype=np.int64).reshape(len(GROUPS), len(MEASURES), len(names))
        return cls(names, keep, np.asarray(row["pairs"], dtype=np.int64), table, examples)

    def summary(self, control: str = "rank_matched") -> dict[str, Any]:
        """``attributes.json``: attributes ordered by the lift's lower bound (undefined last).

        rate: share of the attribute's words, over the probe-only pairs, that one caption
        uses and the other does not; control_rate: the same over the ``control`` groups
        (``CONTROLS``; reference_rate, matched_rate, rank_matched_rate: each alone); lift = rate / control_rate with its
        95 % interval ``ci``; pairs: probe-only pairs where either caption uses the
        attribute; pair_rate / control_pair_rate: share of those whose word sets differ.
        """
        if control not in CONTROLS:
            raise ValueError(f"attributes: control must be one of {sorted(CONTROLS)}, got {control!r}")
        ctl = list(CONTROLS[control])
        words, differ, using, differ_pairs = (self.table[:, m, :] for m in range(len(MEASURES)))
        out = []
        for j, name in enumerate(self.names):
            n1, a = int(words[0, j]), int(differ[0, j])
            n2, c = int(words[ctl, j].sum()), int(differ[ctl, j].sum())
            lift, lo, hi = lift_ci(a, n1, c, n2)
            out.append(
                {
                    "name": name,
                    "lift": _round(lift),
                    "ci": [_round(lo), _round(hi)],
                    "rate": _ratio(a, n1),
                    "control_rate": _ratio(c, n2),
                    "pairs": int(using[0, j]),
                    "control_pairs": int(using[ctl, j].sum()),
                    "words": n1,
                    "differ_words": a,
                    "control_words": n2,
                    "control_differ_words": c,
                    "reference_rate": _ratio(int(differ[1, j]), int(words[1, j])),
                    "matched_rate": _ratio(int(differ[2, j]), int(words[2, j])),
                    "rank_matched_rate": _ratio(int(differ[3, j]), int(words[3, j])),
                    "pair_rate": _ratio(int(differ_pairs[0, j]), int(using[0, j])),
                    "control_pair_rate": _ratio(int(differ_pairs[ctl, j].sum()), int(using[ctl, j].sum())),
                    "examples": [i for _, i in self.examples[name]],
                }
            )
        out.sort(key=_by_lower_bound)
        return {
            "attributes": out,
            "control": control,
            "pairs": int(self.pairs[0]),
            "control_pairs": {g: int(v) for g, v in zip(GROUPS[1:], self.pairs[1:], strict=True)},
        }


def _by_lower_bound(row: Mapping[str, Any]) -> tuple[float, str]:
    lo = row["ci"][0]
    return (-lo if lo is not None else math.inf, str(row["name"]))


def _round(v: float | None) -> float | None:
    return None if v is None else round(float(v), 4)


def _ratio(a: int, n: int) -> float | None:
    return _round(a / n) if n else None


class AttributeCounts:
    """Batch stage: ``ROWS_SCHEMA`` rows (pyarrow table or dict of columns) in, one row of
    ``Counts`` (``pairs``, ``table``, ``examples``) out."""

    needs = ("rank", "id", "caption", "neighbour_captions", "reference_captions", "matched_captions",
             "rank_matched_captions")

    def __init__(self, lexicons: Lexicons, examples: int = 8) -> None:
        self.lexicons = lexicons
        self.keep = examples

    def counts(self, batch: pa.Table | Mapping[str, Any]) -> Counts:
        cols = _columns(batch, self.needs, "attributes")
        names = self.lexicons.names
        out = Counts(names, self.keep)
        cache: dict[str, tuple[frozenset[str], ...]] = {}

        def describe(text: str | None) -> tuple[frozenset[str], ...]:
            key = text or ""
            if key not in cache:
                cache[key] = self.lexicons.describe(key)
            return cache[key]

        examples: dict[str, list[tuple[int, str]]] = {n: [] for n in names}
        t = out.table
        rows = zip(*(cols[k] for k in self.needs), strict=True)
        for rank, id_, caption, *groups in rows:
            own = describe(caption)
            for g, others in enumerate(groups):
                for other in others or ():
                    theirs = describe(other)
                    out.pairs[g] += 1
                    for j, (x, y) in enumerate(zip(own, theirs, strict=True)):
                        union = len(x | y)
                        if not union:
                            continue
                        odd = len(x ^ y)
                        t[g, 0, j] += union
                        t[g, 1, j] += odd
                        t[g, 2, j] += 1
                        if odd:
                            t[g, 3, j] += 1
                            if g == 0:
                                examples[names[j]].append((int(rank), str(id_)))
        for name, found in examples.items():
            out.examples[name] = sorted(set(found))[: self.keep]
        return out

    def __call__(self, batch: pa.Table | Mapping[str, Any]) -> dict[str, Any]:
        return self.counts(batch).to_row()


def _columns(batch: pa.Table | Mapping[str, Any], needs: tuple[str, ...], stage: str) -> dict[str, list[Any]]:
    require(batch, needs, stage)
    if isinstance(batch, pa.Table):
        return {k: batch.column(k).to_pylist() for k in needs}
    return {k: [v.tolist() if isinstance(v, np.ndarray) else v for v in batch[k]] for k in needs}


def count_rows(rows: pa.Table, lexicons: Lexicons, examples: int = 8, block: int = 4096) -> Counts:
    """``AttributeCounts`` over ``rows`` block by block, without Ray."""
    total = Counts(lexicons.names, examples)
    stage = AttributeCounts(lexicons, examples)
    for start in range(0, rows.num_rows, block):
        total.add(stage.counts(rows.slice(start, block)))
    return total


def count_dataset(ds: Any, lexicons: Lexicons, examples: int = 8, batch_size: int = 1024, actors: int = 1) -> Counts:
    """The Ray Data stage: ``AttributeCounts`` over a dataset of ``ROWS_SCHEMA`` rows on a pool
    of ``actors``, its one-row-per-batch counts folded as they stream in (the driver holds
    one ``Counts``, whatever the number of rows)."""
    import ray.data

    counted = ds.map_batches(
        AttributeCounts,
        fn_constructor_kwargs={"lexicons": lexicons, "examples": examples},
        batch_format="pyarrow",
        batch_size=batch_size,
        compute=ray.data.ActorPoolStrategy(size=actors),
    )
    total = Counts(lexicons.names, examples)
    for batch in counted.iter_batches(batch_format="pyarrow", batch_size=None):
        for row in batch.to_pylist():
            total.add(Counts.from_row(row, lexicons.names, examples))
    return total


# ---------------------------------------------------------------------------------------
# Input rows from the mined table


# The discrepancy columns a case row of the contrast is made from.
CASE_COLUMNS = ("rank", "id", "probe_neighbours", "probe_only", "probe_only_probe_cos",
                "probe_only_reference_rank", "reference_neighbours")


def probe_only_cosines(top: pa.Table) -> np.ndarray:
    """The probe cosines of the probe-only pairs of the case rows ``top``: what the matched
    control's agreeing pairs are sampled to."""
    return np.asarray(pc.list_flatten(top.column("probe_only_probe_cos")).to_numpy(zero_copy_only=False),
                      dtype=np.float64)


def build_rows(
    top: pa.Table,
    matched: list[tuple[str, str]],
    ranks: Callable[[list[str]], Mapping[str, int]],
    captions: Callable[[list[str]], Mapping[str, tuple[str, str]]],
    deep_reference: Callable[[list[str]], Mapping[str, Sequence[str]]] | None = None,
) -> pa.Table:
    """``ROWS_SCHEMA`` rows from the case rows ``top`` (``CASE_COLUMNS``, rank order), the
    ``matched`` agreeing pairs, and look-ups that touch only the ids asked for: ``ranks``
    (ids -> rank), ``captions`` (ids -> (uri, caption)) and ``deep_reference`` (case ids ->
    each one's reference list to the mining depth, best first).

    Each row: the image's caption, its probe-only neighbours' captions, its reference
    neighbours' captions (control), ``matched_captions`` (agreeing pairs attached to the
    image they come from) and ``rank_matched_captions``: for each probe-only neighbour at
    reference rank r, the image's reference neighbour nearest to rank r that is not a probe
    neighbour (as far from the image, to the reference, as the probe-only one, but not
    singled out by the probe); without ``deep_reference`` this control stays empty.
    Memory: the cases and their pairs, never the corpus."""
    case_rows = top.select(list(CASE_COLUMNS)).to_pylist()
    deep = deep_reference([r["id"] for r in case_rows]) if deep_reference is not None else {}
    wanted = {r["id"] for r in case_rows}
    for r in case_rows:
        r["rank_matched"] = rank_matched(
            r["id"], r["probe_neighbours"], r["probe_only_reference_rank"] or [None] * len(r["probe_only"]),
            deep.get(r["id"], []),
        )
        wanted.update(r["probe_only"])
        wanted.update(r["reference_neighbours"])
        wanted.update(r["rank_matched"])
    for i, j in matched:
        wanted.update((i, j))
    lookup = captions(sorted(wanted))
    absent = sorted(wanted - set(lookup))
    if absent:
        raise ValueError(f"attributes: {len(absent)} ids of the discrepancies are not in the corpus, e.g. {absent[:5]}")

    def cap(i: str) -> str:
        return lookup[i][1]

    by_id: dict[str, list[str]] = {}
    for i, j in matched:
        by_id.setdefault(i, []).append(cap(j))
    rows = [
        {
            "rank": r["rank"], "id": r["id"], "caption": cap(r["id"]),
            "neighbour_ids": r["probe_only"],
            "neighbour_captions": [cap(j) for j in r["probe_only"]],
            "reference_captions": [cap(j) for j in r["reference_neighbours"]],
            "matched_captions": by_id.pop(r["id"], []),
            "rank_matched_captions": [cap(j) for j in r["rank_matched"]],
        }
        for r in case_rows
    ]
    rank_of = ranks(sorted(by_id))
    rows += [
        {"rank": rank_of[i], "id": i, "caption": cap(i), "neighbour_ids": [], "neighbour_captions": [],
         "reference_captions": [], "matched_captions": caps, "rank_matched_captions": []}
        for i, caps in sorted(by_id.items())
    ]
    return pa.Table.from_pylist(rows, schema=ROWS_SCHEMA)


def rank_matched(own: str, probe: Sequence[str], ranks: Sequence[int | None], deep: Sequence[str]) -> list[str]:
    """One control per probe-only neighbour: the entry of ``deep`` (the image's reference
    list, best first) nearest to that neighbour's 1-based reference ``ranks`` entry (None:
    beyond the list, so its end), skipping the image, its ``probe`` neighbours and entries
    already taken; ties go to the better rank."""
    used = {own, *probe}
    out: list[str] = []
    depth = len(deep)
    for r in ranks:
        target = (r if r else depth + 1) - 1
        for off in range(depth + 1):
            pick = next((p for p in (target - off, target + off) if 0 <= p < depth and deep[p] not in used), None)
            if pick is not None:
                used.add(deep[pick])
                out.append(deep[pick])
                break
    return out


def matched_pairs_parts(path: str, target_cos: np.ndarray, seed: int, bins: int, executor: Any,
                        ) -> list[tuple[str, str]]:
    """Agreeing pairs (i, j): j in both top-k lists of i, sampled to the distribution of
    ``target_cos`` (the probe cosines of the probe-only pairs) over ``bins`` quantile bins,
    one agreeing pair per probe-only pair where there are enough; each kept or not by a hash
    of (seed, id, position), so the choice does not depend on how the rows are split.

    Two passes over the discrepancy parts under ``path`` (counting, then sampling), each a
    call per part run by ``executor`` (``clipscan.pipeline.executor``): the caller receives
    per-part bin counts, then only the chosen pairs."""
    from clipscan import fs as cfs

    plan = _MatchPlan.of(target_cos, bins)
    if plan is None:
        return []
    names = [p.rsplit("/", 1)[-1] for p in cfs.list_parquet(path)]
    for have in executor.map(_count_part, [(path, n, plan) for n in names]):
        plan.have += have
    out: list[tuple[str, str]] = []
    for ids, nbr in executor.map(_choose_part, [(path, n, plan, seed) for n in names]):
        out += list(zip(ids.tolist(), nbr.tolist(), strict=True))
    return out


_MATCH_COLUMNS = ["id", "probe_neighbours", "probe_cos", "probe_only"]


def _count_part(path: str, name: str, plan: _MatchPlan) -> np.ndarray:
    from clipscan import fs as cfs

    return plan.count(cfs.read_parquet(cfs.join(path, name), columns=_MATCH_COLUMNS))


def _choose_part(path: str, name: str, plan: _MatchPlan, seed: int) -> tuple[np.ndarray, np.ndarray]:
    from clipscan import fs as cfs

    return plan.choose(cfs.read_parquet(cfs.join(path, name), columns=_MATCH_COLUMNS), seed)


@dataclass
class _MatchPlan:
    """The matched control's bins: edges over the target cosines, how many pairs each bin
    wants and (after the counting pass) how many agreeing pairs it has."""

    edges: np.ndarray
    want: np.ndarray
    have: np.ndarray

    @classmethod
    def of(cls, target_cos: np.ndarray, bins: int) -> _MatchPlan | None:
        target_cos = np.asarray(target_cos, dtype=np.float64)
        target_cos = target_cos[np.isfinite(target_cos)]
        if target_cos.size == 0:
            return None
        edges = np.unique(np.quantile(target_cos, np.linspace(0, 1, bins + 1)))
        if edges.size < 2:
            edges = np.array([edges[0] - 1e-6, edges[0] + 1e-6])
        want = np.histogram(target_cos, edges)[0].astype(np.float64)
        return cls(edges, want, np.zeros_like(want))

    def count(self, batch: Any) -> np.ndarray:
        _, _, _, b = _agreeing(_record_batch(batch), self.edges)
        return np.bincount(b[b >= 0], minlength=len(self.want))[: len(self.want)].astype(np.float64)

    def choose(self, batch: Any, seed: int) -> tuple[np.ndarray, np.ndarray]:
        keep_p = np.where(self.have > 0, np.minimum(1.0, self.want / np.maximum(self.have, 1)), 0.0)
        ids, nbr, key, b = _agreeing(_record_batch(batch), self.edges)
        chosen = (b >= 0) & (dc_uniform(seed, key) < keep_p[np.maximum(b, 0)])
        return ids[chosen], nbr[chosen]


def _record_batch(batch: Any) -> pa.RecordBatch:
    if isinstance(batch, pa.RecordBatch):
        return batch
    table = batch.combine_chunks()
    return table.to_batches()[0] if table.num_rows else pa.RecordBatch.from_pylist([], schema=table.schema)


def _agreeing(batch: pa.RecordBatch, edges: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Flattened probe-neighbour pairs of a batch that are not probe-only: (image id,
    neighbour id, hash key from the image's id and the position, bin index or -1 outside the edges)."""
    neighbours = batch.column("probe_neighbours")
    parent = np.asarray(pc.list_parent_indices(neighbours).to_numpy(), dtype=np.int64)
    nbr = np.asarray(pc.list_flatten(neighbours).to_numpy(zero_copy_only=False), dtype=object)
    cos = np.asarray(pc.list_flatten(batch.column("probe_cos")).to_numpy(zero_copy_only=False), dtype=np.float64)
    ids = np.asarray(batch.column("id").to_numpy(zero_copy_only=False), dtype=object)
    hashes = hash_ids(ids)
    only = batch.column("probe_only")

    def keys(lists: pa.Array) -> pa.Array:
        parents = pc.cast(pc.list_parent_indices(lists), pa.string())
        return pc.binary_join_element_wise(parents, pc.list_flatten(lists), "\x00")

    agree = ~np.asarray(pc.is_in(keys(neighbours), value_set=keys(only)).to_numpy(zero_copy_only=False), dtype=bool)
    offsets = np.asarray(neighbours.offsets.to_numpy(), dtype=np.int64)
    offsets -= offsets[0]  # a sliced batch starts mid-array
    position = np.arange(parent.size, dtype=np.int64) - offsets[parent]
    key = hashes[parent] + position.astype(np.uint64)
    b = np.searchsorted(edges, cos, side="right") - 1
    b[cos == edges[-1]] = len(edges) - 2
    b = np.where(agree & (b >= 0) & (b < len(edges) - 1), b, -1)
    return ids[parent], nbr, key, b


# ---------------------------------------------------------------------------------------
# The job step


def run_contrast(rows: pa.Table, cfg: Any, use_ray: bool | None = None) -> dict[str, Any]:
    """``ROWS_SCHEMA`` rows and an ``AttributesConfig`` in; the ``attributes.json`` mapping out
    (with ``planted``/``planted_found`` when ``cfg.planted`` names the planted attribute).

    ``use_ray`` None: the Ray Data stage when the rows fill more than one batch
    (``cfg.batch_size``), else the same counting in this process (no actor to start)."""
    lexicons = load_lexicons(cfg.names, cfg.lexicons)
    if use_ray is None:
        use_ray = rows.num_rows > cfg.batch_size
    if use_ray:
        import ray.data

        counts = count_dataset(ray.data.from_arrow(rows), lexicons, cfg.examples, cfg.batch_size)
    else:
        counts = count_rows(rows, lexicons, cfg.examples, cfg.batch_size)
    out = counts.summary(cfg.control)
    out["lexicons"] = dict(lexicons.sources)
    if cfg.planted is not None:
        top = out["attributes"][0] if out["attributes"] else {}
        lo = top.get("ci", [None])[0]
        out["planted"] = cfg.planted
        out["planted_found"] = bool(top.get("name") == cfg.planted and lo is not None and lo > 1)
    return out


def shift_rows(shifts: Sequence[Mapping[str, Any]]) -> pa.Table:
    """TCAC: one transform's caption shifts (``clipscan.stages.tcac.figures.caption_shifts``) as
    ``ROWS_SCHEMA`` rows: the image's caption against the captions that entered its top list
    (in the probe-only place) and, as the control, against those that left it (in the
    ``reference_captions`` place; summarise with ``control="reference"``)."""
    return pa.Table.from_pylist(
        [
            {"rank": i, "id": s["id"], "caption": s["caption"], "neighbour_ids": [],
             "neighbour_captions": list(s["entered"]), "reference_captions": list(s["left"]),
             "matched_captions": [], "rank_matched_captions": []}
            for i, s in enumerate(shifts, start=1)
        ],
        schema=ROWS_SCHEMA,
    )


def tcac_contrast(table: pa.Table, transforms: Sequence[str], cfg: Any, use_ray: bool | None = None) -> dict[str, Any]:
    """TCAC ``tcac.parquet`` in; per transform, the ``attributes.json`` mapping of the
    ``cfg.cases`` images whose top list changed most: which attributes the captions that
    entered the top list differ in from the image's caption more often than those that left."""
    from clipscan.stages.tcac.figures import caption_shifts

    shifts = caption_shifts(table, transforms, cfg.cases)
    per: dict[str, Any] = {}
    for name in transforms:
        rows = shift_rows([s for s in shifts[name] if s["entered"]])
        per[name] = run_contrast(rows, cfg.model_copy(update={"control": "reference", "planted": None}), use_ray)
        per[name]["control"] = "left the top list"
    return {"transforms": per}
