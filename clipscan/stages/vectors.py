"""Both models' vectors in (the embed stage's parts or ``emb:PATH``), one row per image with both vectors out.

``joined_vectors`` is what search and mining consume: a Ray Dataset of ``id`` (string),
``probe`` and ``reference`` (FixedSizeList<float32, d>, L2-normalised) and the corpus
columns ``caption``, ``uri``, ``url``, for the images present in both models. It is built
by Ray Data's distributed ``Dataset.join`` on ``id`` (a hash shuffle: no process holds more
than its partition). ``skipped_vectors`` gives the rows that are not there with the reason
(present in one model only, an unusable vector), and ``paired_vectors`` both at once (one
shuffle) for a job that writes them in the same pass. All three build; none executes.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from clipscan.data.precomputed import (
    FilePair,
    embedding_pairs,
    read_vectors,
    run_pairs,
    vector_bytes,
)
from clipscan.models.registry import is_precomputed

if TYPE_CHECKING:
    import ray.data

CORPUS_COLUMNS = ("caption", "uri", "url")
PARTITION_BYTES = 64 * 2**20  # vector file bytes (both models) per join partition, when not given
SKIP_STAGE = "join"


def model_pairs(run_dir: str, name: str, spec: str) -> list[FilePair]:
    """Where model ``name`` is read from: ``emb:PATH`` itself, or the run's ``embeddings/<name>`` parts."""
    if is_precomputed(spec):
        return embedding_pairs(spec[len("emb:"):])
    return run_pairs(run_dir, name)


def side(batch: pa.Table, name: str) -> pa.Table:
    """One model's read rows -> ``id``, ``<name>``, ``<name>_caption`` ... (prefixed so the join keeps both)."""
    return pa.table({
        "id": batch.column("id"),
        name: batch.column("embedding"),
        **{f"{name}_{c}": batch.column(c) for c in (*CORPUS_COLUMNS, "renormalised", "skip_reason")},
    })


def settle(batch: pa.Table, names: tuple[str, str]) -> pa.Table:
    """Full-outer-joined rows -> ``id``, both vectors, ``caption``/``uri``/``url`` (first model that has
    one), ``renormalised_<name>``, and ``skip_stage``/``skip_reason`` ("" where the row is usable).

    A side missing from the join has a null vector; its reason says which model lacks the id.
    An id on more than one row (a duplicate in either model) is skipped on every row: which
    vector is the image's is unknown. The join puts all rows of an id in one partition;
    they are seen together here unless the partition was split into several blocks.
    """
    n = batch.num_rows
    reasons = np.full(n, "", dtype=object)
    ids = np.asarray(batch.column("id").cast(pa.string()).to_numpy(zero_copy_only=False), dtype=object)
    _, inverse, repeats = np.unique(ids, return_inverse=True, return_counts=True)
    if n and repeats.max() > 1:
        times = repeats[inverse]
        reasons = np.where(times > 1, np.char.add(np.char.add("duplicate id (", times.astype(str)),
                                                  " rows pair up under it)").astype(object), reasons)
    for name, other in (names, names[::-1]):
        missing = np.asarray(batch.column(name).is_null())
        bad = np.asarray(batch.column(f"{name}_skip_reason").fill_null(""), dtype=object)
        reasons = np.where((reasons == "") & missing, f"no {name} embedding (the id is in {other} only)", reasons)
        reasons = np.where((reasons == "") & (bad != ""), f"{name}: " + bad.astype(str), reasons)
    out: dict[str, Any] = {"id": batch.column("id").cast(pa.string())}
    for name in names:
        column = batch.column(name)
        out[name] = column.cast(pa.list_(pa.float32(), column.type.list_size))
    for c in CORPUS_COLUMNS:
        first = batch.column(f"{names[0]}_{c}").fill_null("")
        second = batch.column(f"{names[1]}_{c}").fill_null("")
        out[c] = pc.if_else(pc.equal(first, ""), second, first).cast(pa.string())
    for name in names:
        out[f"renormalised_{name}"] = batch.column(f"{name}_renormalised").fill_null(False)
    out["skip_stage"] = pa.array(np.where(reasons == "", "", SKIP_STAGE).tolist(), pa.string())
    out["skip_reason"] = pa.array(reasons.tolist(), pa.string())
    return pa.table(out)


def usable(batch: pa.Table, names: tuple[str, str]) -> pa.Table:
    """Settled rows -> the rows both models have, ``id``, both vectors and the corpus columns."""
    ok = batch.filter(pc.equal(batch.column("skip_reason"), ""))
    return ok.select(["id", *names, *CORPUS_COLUMNS])


def skips(batch: pa.Table) -> pa.Table:
    """Settled rows -> skipped records ``id``, ``uri``, ``stage``, ``reason``."""
    from clipscan.stages.rows import SKIPPED_SCHEMA

    bad = batch.filter(pc.not_equal(batch.column("skip_reason"), ""))
    return pa.table({"id": bad.column("id"), "uri": bad.column("uri"), "stage": bad.column("skip_stage"),
                     "reason": bad.column("skip_reason")}).cast(SKIPPED_SCHEMA)


def paired_vectors(
    run_dir: str,
    models: Mapping[str, str],
    rows_per_block: int = 100_000,
    num_partitions: int | None = None,
) -> ray.data.Dataset:
    """Every id of either model, settled (see ``settle``): usable rows and skipped rows together.

    models: {name: spec} for exactly two models (``probe``, ``reference``); an ``emb:`` spec is
    read from its path, any other from ``run_dir/embeddings/<name>`` (the embed stage's parts,
    with ``run_dir/corpus`` for captions and uris). rows_per_block: rows per read block.
    num_partitions: join partitions; None = one per ``PARTITION_BYTES`` of vector files, at
    least the cluster's CPUs. Builds; executes nothing.
    """
    import ray

    names = tuple(models)
    if len(names) != 2:
        raise ValueError(f"paired_vectors joins two models, got {list(names)}")
    pairs = {name: model_pairs(run_dir, name, spec) for name, spec in models.items()}
    sides = [
        read_vectors(pairs[name], rows_per_block).map_batches(
            side, fn_kwargs={"name": name}, batch_format="pyarrow", batch_size=None  # type: ignore[arg-type]
        )
        for name in names
    ]
    if num_partitions is None:
        cpus = int(ray.cluster_resources().get("CPU", 1)) if ray.is_initialized() else 1
        total = sum(vector_bytes(p) for p in pairs.values())
        num_partitions = max(-(-total // PARTITION_BYTES), cpus, 1)
    joined = sides[0].join(sides[1], "full_outer", num_partitions=num_partitions, on=("id",))
    return joined.map_batches(
        settle, fn_kwargs={"names": names}, batch_format="pyarrow", batch_size=None  # type: ignore[arg-type]
    )


def joined_vectors(
    run_dir: str,
    models: Mapping[str, str],
    rows_per_block: int = 100_000,
    num_partitions: int | None = None,
) -> ray.data.Dataset:
    """One row per image present in both models: ``id`` (string), ``<name>`` for each model
    (FixedSizeList<float32, d>, L2-normalised), ``caption``, ``uri``, ``url`` ("" where unknown).

    Rows are in no particular order (sort by id where order matters). Arguments as for
    ``paired_vectors``. Builds; executes nothing.
    """
    names = tuple(models)
    return paired_vectors(run_dir, models, rows_per_block, num_partitions).map_batches(
        usable, fn_kwargs={"names": names}, batch_format="pyarrow", batch_size=None  # type: ignore[arg-type]
    )


def skipped_vectors(
    run_dir: str,
    models: Mapping[str, str],
    rows_per_block: int = 100_000,
    num_partitions: int | None = None,
) -> ray.data.Dataset:
    """The ids ``joined_vectors`` leaves out, as skipped records (``id``, ``uri``, ``stage``, ``reason``)."""
    return paired_vectors(run_dir, models, rows_per_block, num_partitions).map_batches(
        skips, batch_format="pyarrow", batch_size=None  # type: ignore[arg-type]
    )
