"""ComCO probe set and embeddings in; per-scene bias facts (``bias.parquet``) and the figures of ``bias.json`` out.

"CLIP Under the Microscope": a text encoder favours the object named first, an image
encoder the largest object. The probe set is seeded scenes of 2-5 objects from a fixed
vocabulary (distinct in colour and in shape within a scene), each object at a controlled
size rank (its area in the image, whatever its shape), plus one image and one caption of every single object. Per model and scene:

* text order: each caption naming the scene's objects in one order retrieves a single-object
  caption; the hit is tallied by that object's position in the caption;
* image size: the scene's image retrieves a single-object image (and, for models with a
  text tower, a single-object caption); the hit is tallied by that object's size rank;
* matching: the scene's image against its caption with the largest object named first (and,
  separately, last) and the same-order captions of up to ``distractors`` other scenes of
  the same object count; correct when the true caption ranks first.

Every argmax breaks ties (cosines within ``TIE_TOL``) by a seeded draw, never by index
order, so a model without a bias shows none. Shares are means over scenes, each scene
weighted once; 95 % Wilson intervals take the number of scenes as n.
"""

from __future__ import annotations

import io
import itertools
import zlib
from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import Any

import numpy as np
import pyarrow as pa

from clipscan import fs as cfs
from clipscan.stats import wilson

TIE_TOL = 1e-6  # cosines this close to a row's best are a tie

SCENES_SCHEMA = pa.schema([
    ("id", pa.string()),
    ("n_objects", pa.int32()),
    ("objects", pa.list_(pa.int32())),  # vocabulary indices in scene order
    ("names", pa.list_(pa.string())),  # "colour shape" in scene order
    ("size_ranks", pa.list_(pa.int32())),  # 0 = largest, in scene order
    ("areas", pa.list_(pa.float64())),  # fraction of the image each object covers, in scene order
    ("diameters", pa.list_(pa.float64())),  # bounding-circle diameters, fraction of the image side
    ("xs", pa.list_(pa.float64())),  # centres, fraction of the width, 0 = left
    ("ys", pa.list_(pa.float64())),  # centres, fraction of the height, 0 = top
])
CAPTIONS_SCHEMA = pa.schema([
    ("caption_id", pa.int64()),
    ("scene", pa.string()),  # scene id, or the object's id for single-object captions
    ("kind", pa.string()),  # order | largest_first | largest_last | single
    ("text", pa.string()),
    ("objects", pa.list_(pa.int32())),  # vocabulary indices in caption order
])
FACTS_SCHEMA = pa.schema([
    ("model", pa.string()),  # the probe's spec
    ("scene", pa.string()),
    ("n_objects", pa.int32()),
    ("text_captions", pa.int32()),  # order captions of the scene (null without a text tower)
    ("text_hits", pa.list_(pa.int32())),  # per caption position: captions whose first retrieval is the object there
    ("text_misses", pa.int32()),  # captions whose first retrieval is an object not in the scene
    ("image_rank", pa.int32()),  # size rank of the object the image retrieves among single-object images, -1 = not in the scene
    ("caption_rank", pa.int32()),  # the same among single-object captions (null without a text tower)
    ("match_first", pa.bool_()),  # true caption, largest object named first, ranks first
    ("match_last", pa.bool_()),  # the same, largest object named last
    ("match_candidates", pa.int32()),  # captions in each matching test (true one included)
])


# ---------------------------------------------------------------------------------------
# The probe set


def vocabulary(entries: Sequence[str] | None) -> list[tuple[str, str]]:
    """``["red circle", ...]`` -> ``[("red", "circle"), ...]``; None = every generator colour x shape."""
    from clipscan.data.scenes import PALETTE, SHAPES

    if entries is None:
        return [(c, s) for s in SHAPES for c in PALETTE]
    out: list[tuple[str, str]] = []
    for entry in entries:
        colour, _, shape = entry.strip().rpartition(" ")
        if colour not in PALETTE or shape not in SHAPES:
            raise ValueError(f"bias.vocabulary: {entry!r} is not 'colour shape' with colour in "
                             f"{sorted(PALETTE)} and shape in {list(SHAPES)}")
        if (colour, shape) in out:
            raise ValueError(f"bias.vocabulary: {entry!r} is listed twice")
        out.append((colour, shape))
    return out


@dataclass(frozen=True)
class ProbeScene:
    """One multi-object scene: its objects in scene order and the captions' orders of them."""

    id: str
    objects: tuple[int, ...]  # vocabulary indices
    ranks: tuple[int, ...]  # size rank of each object, 0 = largest
    orders: tuple[tuple[int, ...], ...]  # each a permutation of range(n): object indices in caption order
    largest_first: tuple[int, ...]
    largest_last: tuple[int, ...]


def caption_orders(rng: np.random.Generator, n: int, cap: int) -> list[tuple[int, ...]]:
    """Orders of n objects for a scene's captions: all n! when they fit under ``cap``.

    Otherwise whole rotations of seeded base orders (so every object is named at every
    position equally often), ``cap // n`` of them; fewer than n allowed orders take the
    first ``cap`` rotations of one base order.
    """
    every = list(itertools.permutations(range(n)))
    if len(every) <= cap:
        return every
    out: list[tuple[int, ...]] = []
    seen: set[tuple[int, ...]] = set()
    while len(out) < max(1, cap // n) * n:
        base = [int(i) for i in rng.permutation(n)]
        rotations = [tuple(base[(i + k) % n] for i in range(n)) for k in range(n)]
        if any(r in seen for r in rotations):
            continue
        out += rotations
        seen.update(rotations)
    return out[:cap] if cap < n else out


def make_probe_scene(seed: int, n: int, index: int, vocab: Sequence[tuple[str, str]], orders: int) -> ProbeScene:
    """Scene ``index`` of the ``n``-object stream of ``seed``; a pure function of its arguments."""
    rng = np.random.default_rng([seed, 0xB1A5, n, index])
    picked: list[int] = []
    colours: set[str] = set()
    shapes: set[str] = set()
    for v in rng.permutation(len(vocab)):
        colour, shape = vocab[int(v)]
        if colour not in colours and shape not in shapes:
            picked.append(int(v))
            colours.add(colour)
            shapes.add(shape)
            if len(picked) == n:
                break
    if len(picked) < n:
        raise ValueError(f"bias.vocabulary has no {n} objects distinct in both colour and shape "
                         f"({len(vocab)} objects, {len({c for c, _ in vocab})} colours, "
                         f"{len({s for _, s in vocab})} shapes)")
    ranks = tuple(int(r) for r in rng.permutation(n))
    largest = ranks.index(0)
    others = [int(i) for i in rng.permutation(n) if i != largest]
    return ProbeScene(
        id=f"scene-{n}-{index:06d}", objects=tuple(picked), ranks=ranks,
        orders=tuple(caption_orders(rng, n, orders)),
        largest_first=(largest, *others), largest_last=(*others, largest),
    )


def single_id(v: int) -> str:
    return f"object-{v:04d}"


def write_probe_set(root: str, vocab: Sequence[tuple[str, str]], counts: Sequence[int], per_count: int,
                    orders: int, areas: Sequence[float], single_area: float, background: str,
                    seed: int, size: int) -> dict[str, int]:
    """Render the probe set under ``root``: ``images/*.png``, ``manifest.parquet`` (a manifest corpus:
    ``id``, ``image``, ``caption``), ``scenes.parquet`` (``SCENES_SCHEMA``), ``captions.parquet``
    (``CAPTIONS_SCHEMA``; caption ids in row order). PNG, so every object keeps its exact colour.

    Same arguments, same bytes. The manifest is written last, so one that exists names a
    complete set. Returns counts of scenes, single objects and captions.
    """
    from clipscan.data.scenes import (
        caption_for,
        diameter_for_area,
        place_objects,
        plain_background,
        render_objects,
    )

    bg = plain_background(background)

    def png(objects: Sequence[Any]) -> bytes:
        buf = io.BytesIO()
        render_objects(objects, bg, size).save(buf, "PNG")
        return buf.getvalue()

    manifest: dict[str, list[Any]] = {"id": [], "image": [], "caption": []}
    scenes: dict[str, list[Any]] = {name: [] for name in SCENES_SCHEMA.names}
    captions: dict[str, list[Any]] = {name: [] for name in CAPTIONS_SCHEMA.names}

    def add_caption(scene: str, kind: str, text: str, objects: Sequence[int]) -> None:
        captions["caption_id"].append(len(captions["caption_id"]))
        captions["scene"].append(scene)
        captions["kind"].append(kind)
        captions["text"].append(text)
        captions["objects"].append(list(objects))

    for v, (colour, shape) in enumerate(vocab):
        obj = place_objects([seed, 0x51, v], [(shape, colour)], [diameter_for_area(shape, single_area)])[0]
        obj = replace(obj, x=0.5, y=0.5)  # centred: the single images differ only in the object
        ident = single_id(v)
        cfs.write_bytes_atomic(cfs.join(root, "images", f"{ident}.png"), png([obj]))
        text = caption_for([obj], "short")
        manifest["id"].append(ident)
        manifest["image"].append(f"images/{ident}.png")
        manifest["caption"].append([text])
        add_caption(ident, "single", text, [v])
    for n in counts:
        for index in range(per_count):
            sc = make_probe_scene(seed, n, index, vocab, orders)
            kinds = [(vocab[v][1], vocab[v][0]) for v in sc.objects]
            objs = place_objects([seed, 0x9A, n, index], kinds,
                                 [diameter_for_area(shape, areas[r]) for (shape, _), r in zip(kinds, sc.ranks, strict=True)])
            cfs.write_bytes_atomic(cfs.join(root, "images", f"{sc.id}.png"), png(objs))
            texts = []
            for kind, order_list in (("order", sc.orders), ("largest_first", [sc.largest_first]),
                                     ("largest_last", [sc.largest_last])):
                for order in order_list:
                    text = caption_for([objs[i] for i in order], "short")
                    add_caption(sc.id, kind, text, [sc.objects[i] for i in order])
                    texts.append(text)
            manifest["id"].append(sc.id)
            manifest["image"].append(f"images/{sc.id}.png")
            manifest["caption"].append(list(dict.fromkeys(texts)))
            scenes["id"].append(sc.id)
            scenes["n_objects"].append(n)
            scenes["objects"].append(list(sc.objects))
            scenes["names"].append([f"{vocab[v][0]} {vocab[v][1]}" for v in sc.objects])
            scenes["size_ranks"].append(list(sc.ranks))
            scenes["areas"].append([areas[r] for r in sc.ranks])
            scenes["diameters"].append([o.diameter for o in objs])
            scenes["xs"].append([o.x for o in objs])
            scenes["ys"].append([o.y for o in objs])
    cfs.write_parquet_atomic(cfs.join(root, "scenes.parquet"), pa.table(scenes, schema=SCENES_SCHEMA))
    cfs.write_parquet_atomic(cfs.join(root, "captions.parquet"), pa.table(captions, schema=CAPTIONS_SCHEMA))
    cfs.write_parquet_atomic(cfs.join(root, "manifest.parquet"), pa.table({
        "id": pa.array(manifest["id"], pa.string()), "image": pa.array(manifest["image"], pa.string()),
        "caption": pa.array(manifest["caption"], pa.list_(pa.string())),
    }))
    return {"scenes": len(scenes["id"]), "objects": len(vocab), "captions": len(captions["caption_id"])}


# ---------------------------------------------------------------------------------------
# Retrieval with seeded tie-breaks


def first_retrieved(sims: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """(m,) int64: per row of sims (m, g), the column of the highest value.

    Columns within ``TIE_TOL`` of a row's best are tied and one of them is drawn from
    ``rng`` (one uniform per cell, so the draw does not depend on the column order).
    Cells at -inf are never picked.
    """
    draw = rng.random(sims.shape)
    if sims.size == 0:
        return np.zeros(len(sims), dtype=np.int64)
    best = sims.max(axis=1, keepdims=True)
    tied = (sims >= best - TIE_TOL) & np.isfinite(sims)
    return np.argmax(np.where(tied, draw, -1.0), axis=1).astype(np.int64)


def _rng(seed: int, model: str, task: str) -> np.random.Generator:
    # seeded by the model's spec, not its place in the list: reordering models.probes changes nothing
    return np.random.default_rng([seed, zlib.crc32(model.encode()), zlib.crc32(task.encode())])


def _padded(lists: Sequence[Sequence[int]], width: int) -> np.ndarray:
    out = np.full((len(lists), width), -1, dtype=np.int64)
    for i, values in enumerate(lists):
        out[i, : len(values)] = values
    return out


def _position_of(retrieved: np.ndarray, objects: np.ndarray) -> np.ndarray:
    """(m,) index of retrieved[i] in objects[i] (m, w) padded with -1, or -1 when absent."""
    match = objects == retrieved[:, None]
    return np.where(match.any(axis=1), match.argmax(axis=1), -1)


def scene_facts(model: str, scenes: pa.Table, captions: pa.Table, scene_image: np.ndarray,
                single_image: np.ndarray, text: np.ndarray | None, seed: int, distractors: int) -> pa.Table:
    """The per-scene facts of one model (``FACTS_SCHEMA``), scenes in the order of ``scenes``.

    scene_image (S, d) and single_image (V, d): image embeddings of the scenes (in row order
    of ``scenes``) and of the vocabulary's single objects, float32, L2-normalised; text
    (C, d) the caption embeddings by ``caption_id``, None for a model without a text tower.
    """
    n_scenes = scenes.num_rows
    n_obj = np.asarray(scenes.column("n_objects").to_numpy(), dtype=np.int64)
    width = int(n_obj.max()) if n_scenes else 1
    objects = _padded(scenes.column("objects").to_pylist(), width)
    ranks = _padded(scenes.column("size_ranks").to_pylist(), width)
    scene_row = {s: i for i, s in enumerate(scenes.column("id").to_pylist())}

    hit = first_retrieved(scene_image @ single_image.T, _rng(seed, model, "image_size"))
    pos = _position_of(hit, objects)
    image_rank = np.where(pos >= 0, np.take_along_axis(ranks, np.maximum(pos, 0)[:, None], 1)[:, 0], -1)
    cols: dict[str, Any] = {
        "model": pa.array([model] * n_scenes, pa.string()),
        "scene": scenes.column("id"),
        "n_objects": pa.array(n_obj, pa.int32()),
        "image_rank": pa.array(image_rank, pa.int32()),
    }
    if text is None:
        for name in ("text_captions", "text_hits", "text_misses", "caption_rank", "match_first", "match_last",
                     "match_candidates"):
            cols[name] = pa.nulls(n_scenes, FACTS_SCHEMA.field(name).type)
        return pa.table(cols).select(FACTS_SCHEMA.names).cast(FACTS_SCHEMA)

    kind = np.asarray(captions.column("kind").to_pylist(), dtype=object)
    cap_scene = captions.column("scene").to_pylist()
    cap_objects = captions.column("objects").to_pylist()
    cap_ids = np.asarray(captions.column("caption_id").to_numpy(), dtype=np.int64)
    single_rows = cap_ids[kind == "single"]
    single_vocab = np.array([cap_objects[i][0] for i in np.flatnonzero(kind == "single")], dtype=np.int64)
    singles = np.zeros((len(single_image), text.shape[1]), dtype=np.float32)
    singles[single_vocab] = text[single_rows]

    # text order: every order caption retrieves a single-object caption
    order_at = np.flatnonzero(kind == "order")
    order_scene = np.array([scene_row[cap_scene[i]] for i in order_at], dtype=np.int64)
    order_objects = _padded([cap_objects[i] for i in order_at], width)
    got = first_retrieved(text[cap_ids[order_at]] @ singles.T, _rng(seed, model, "text_order"))
    where = _position_of(got, order_objects)
    hits = np.zeros((n_scenes, width), dtype=np.int64)
    np.add.at(hits, (order_scene[where >= 0], where[where >= 0]), 1)
    n_caps = np.bincount(order_scene, minlength=n_scenes)
    misses = np.bincount(order_scene[where < 0], minlength=n_scenes)

    # image size through the text tower: the image retrieves a single-object caption
    chit = first_retrieved(scene_image @ singles.T, _rng(seed, model, "image_size_caption"))
    cpos = _position_of(chit, objects)
    caption_rank = np.where(cpos >= 0, np.take_along_axis(ranks, np.maximum(cpos, 0)[:, None], 1)[:, 0], -1)

    first, last, candidates = matching(scenes, captions, scene_image, text, seed, model, distractors)
    cols.update(
        text_captions=pa.array(n_caps, pa.int32()),
        text_hits=pa.array([hits[i, : n_obj[i]].tolist() for i in range(n_scenes)], pa.list_(pa.int32())),
        text_misses=pa.array(misses, pa.int32()),
        caption_rank=pa.array(caption_rank, pa.int32()),
        match_first=pa.array(first, pa.bool_()),
        match_last=pa.array(last, pa.bool_()),
        match_candidates=pa.array(candidates, pa.int32()),
    )
    return pa.table(cols).select(FACTS_SCHEMA.names).cast(FACTS_SCHEMA)


def matching(scenes: pa.Table, captions: pa.Table, scene_image: np.ndarray, text: np.ndarray, seed: int,
             model: str, distractors: int, block: int = 256) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per scene: (correct with the largest object named first, correct with it named last, candidates).

    The candidates are the scene's own caption and those of up to ``distractors`` other
    scenes with the same object count, drawn once per scene (the same for both orders);
    a distractor whose text equals the true caption's is left out.
    """
    ids = scenes.column("id").to_pylist()
    n_obj = np.asarray(scenes.column("n_objects").to_numpy(), dtype=np.int64)
    kind = captions.column("kind").to_pylist()
    cap_scene = captions.column("scene").to_pylist()
    texts = captions.column("text").to_pylist()
    variant: dict[str, dict[str, int]] = {"largest_first": {}, "largest_last": {}}
    for i, (k, s) in enumerate(zip(kind, cap_scene, strict=True)):
        if k in variant:
            variant[k][s] = i
    caption_id = np.asarray(captions.column("caption_id").to_numpy(), dtype=np.int64)
    out = {k: np.zeros(len(ids), dtype=bool) for k in variant}
    candidates = np.ones(len(ids), dtype=np.int64)
    draw_rng = _rng(seed, model, "matching_distractors")
    for count in np.unique(n_obj):
        group = np.flatnonzero(n_obj == count)
        k = min(distractors, len(group) - 1)
        keys = draw_rng.random((len(group), len(group)))
        np.fill_diagonal(keys, np.inf)
        others = np.argsort(keys, axis=1, kind="stable")[:, :k]  # (G, k) positions within the group
        cand = np.concatenate([np.arange(len(group))[:, None], others], axis=1)  # own caption first
        candidates[group] = k + 1
        for name, rows in variant.items():
            cap_rows = np.array([rows[ids[g]] for g in group], dtype=np.int64)
            cap_text = [texts[r] for r in cap_rows]
            emb = text[caption_id[cap_rows]]
            rng = _rng(seed, model, f"matching_{name}_{count}")
            for start in range(0, len(group), block):
                c = cand[start:start + block]
                sims = np.einsum("bd,bkd->bk", scene_image[group[start:start + block]], emb[c])
                same = np.array([[cap_text[j] == cap_text[row[0]] for j in row[1:]] for row in c], dtype=bool)
                sims[:, 1:][same.reshape(len(c), k)] = -np.inf
                out[name][group[start:start + block]] = first_retrieved(sims, rng) == 0
    return out["largest_first"], out["largest_last"], candidates


# ---------------------------------------------------------------------------------------
# Figures


def _shares(values: np.ndarray, n_obj: np.ndarray, width: int) -> dict[str, Any]:
    """values (S, width): per scene and position/rank, the scene's share; averaged over the scenes that have it."""
    share, ci, chance, per = [], [], [], []
    for p in range(width):
        mask = n_obj > p
        m = int(mask.sum())
        s = float(values[mask, p].mean()) if m else 0.0
        share.append(s)
        ci.append(list(wilson(s, m)))
        chance.append(float((1.0 / n_obj[mask]).mean()) if m else 0.0)
        per.append(m)
    return {"share": share, "ci": ci, "n": len(n_obj), "chance": chance, "scenes": per}


def figures(facts: pa.Table, width: int) -> tuple[dict[str, Any], dict[str, Any]]:
    """One model's facts -> (its ``bias.json`` entry, extra figures for run.json and the report).

    ``share[p]``: the mean over scenes with more than p objects of the share of that scene's
    order captions (text order) or of its image (image size) whose first retrieval is the
    object at position / size rank p; ``ci`` the Wilson interval over those scenes; ``n``
    the number of scenes. The extras hold the chance level (mean 1 / objects over the same
    scenes), scene counts per position, and the matching chance and intervals.
    """
    n_obj = np.asarray(facts.column("n_objects").to_numpy(), dtype=np.int64)
    ranks = np.asarray(facts.column("image_rank").to_numpy(), dtype=np.int64)
    onehot = (ranks[:, None] == np.arange(width)[None, :]).astype(np.float64)
    image = _shares(onehot, n_obj, width)
    entry: dict[str, Any] = {"image_size": {k: image[k] for k in ("share", "ci", "n")}}
    extra: dict[str, Any] = {"image_size": {k: image[k] for k in ("chance", "scenes")}}
    if facts.column("text_captions").null_count == facts.num_rows:
        return entry, extra
    caps = np.asarray(facts.column("text_captions").to_numpy(), dtype=np.float64)
    hits = np.zeros((facts.num_rows, width), dtype=np.float64)
    for i, row in enumerate(facts.column("text_hits").to_pylist()):
        hits[i, : len(row)] = row
    text = _shares(hits / caps[:, None], n_obj, width)
    crank = np.asarray(facts.column("caption_rank").to_numpy(), dtype=np.int64)
    by_caption = _shares((crank[:, None] == np.arange(width)[None, :]).astype(np.float64), n_obj, width)
    first = np.asarray(facts.column("match_first").to_numpy(zero_copy_only=False), dtype=np.float64)
    last = np.asarray(facts.column("match_last").to_numpy(zero_copy_only=False), dtype=np.float64)
    cand = np.asarray(facts.column("match_candidates").to_numpy(), dtype=np.float64)
    entry["text_order"] = {k: text[k] for k in ("share", "ci", "n")}
    entry["image_size"]["caption"] = {k: by_caption[k] for k in ("share", "ci", "n")}
    entry["matching"] = {"largest_first": float(first.mean()), "largest_last": float(last.mean()), "n": len(first)}
    extra["text_order"] = {k: text[k] for k in ("chance", "scenes")}
    extra["matching"] = {
        "chance": float((1.0 / cand).mean()),
        "ci_first": list(wilson(float(first.mean()), len(first))),
        "ci_last": list(wilson(float(last.mean()), len(last))),
    }
    return entry, extra


def probe_has_text(spec: str) -> bool:
    """Whether the model ``spec`` names has a text tower (loads it once, on CPU)."""
    from clipscan.models.registry import load_encoder

    return bool(load_encoder(spec).has_text)


def known_text_tower(spec: str) -> bool | None:
    """True where the spec alone says the model has a text tower (every open_clip model); None = load it to see."""
    from clipscan.models.registry import parse_spec

    return True if parse_spec(spec).kind == "open_clip" else None
