import json
import subprocess
import sys
from pathlib import Path

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest

from tests.conftest import ROOT, TINY_PROBE, TINY_REFERENCE, load_job, overrides, run_without_ray

daf = load_job("daf")  # the job script itself, run in-process


def _args(manifest: str, out: Path, *extra: str) -> list[str]:
    return [
        "--config", str(ROOT / "configs" / "daf-tiny.yaml"),
        *overrides(f"data.path={manifest}", f"output={out}", f"models.probe={TINY_PROBE}",
                   f"models.reference={TINY_REFERENCE}", "embed.image_size=48", "mining.cases=10", "report.rows=5",
                   *extra),
    ]


def test_daf_main_end_to_end(tmp_path: Path, scene_corpus: str, ray_local: None, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "run"
    stage = "knn.stage_min_rows=2"  # the sharded search stage, as on a large corpus
    assert daf.main(_args(scene_corpus, out, stage)) == 0
    assert f"report: {out / 'report.html'}" in capsys.readouterr().out
    info = json.loads((out / "run.json").read_text())
    assert info["status"] == "done" and info["job"] == "daf"
    assert info["counts"]["read"] == 120 == info["counts"]["embedded"] + info["counts"]["skipped"]
    assert set(info["stages"]) == {"read", "embed", "index", "mine", "attributes", "summarise", "report"}
    assert all(s["wall_s"] >= 0 for s in info["stages"].values())
    assert info["stages"]["index"]["probe"]["nodes"] == info["stages"]["index"]["reference"]["nodes"] == 1
    assert info["config"]["knn"]["k"] == 10 and "ray" in info["versions"]
    table = pq.read_table(out / "discrepancies.parquet")
    assert table.num_rows == 120 and "rank" not in table.column_names  # every image, in the search's order
    assert table.column("id").to_pylist() == sorted(table.column("id").to_pylist())
    cases = pq.read_table(out / "cases.parquet")
    assert 0 < cases.num_rows <= 10
    ranked = table.take(pc.sort_indices(table, sort_keys=[("overlap", "ascending"), ("gap", "descending"),
                                                          ("id", "ascending")]))
    at = {i: r + 1 for r, i in enumerate(ranked.column("id").to_pylist())}
    assert cases.column("rank").to_pylist() == [at[i] for i in cases.column("id").to_pylist()]  # global ranks
    first = cases.to_pylist()[0]
    assert first["texts"][0] == first["caption"] and len(first["texts"]) == 1 + len(first["neighbour_ids"])
    assert json.loads((out / "failures.json").read_text())["backend"] == "off"
    contrast = json.loads((out / "attributes.json").read_text())
    names = [a["name"] for a in contrast["attributes"]]
    assert sorted(names) == sorted(["colour", "count", "size", "position", "object", "action", "scene"])
    assert contrast["pairs"] > 0 and info["stages"]["attributes"]["pairs"] == contrast["pairs"]
    html = (out / "report.html").read_text()
    assert html.index('id="attributes"') < html.index('id="run"')
    assert "data:image/png;base64" in html and (out / "plots" / "overlap_hist.png").is_file()
    assert (out / "skipped.parquet").is_file() and not (out / "_search").exists()  # the search's scratch parts are gone
    for name in ("discrepancies.parquet", "pairs.parquet"):  # written in parts by the pipeline
        assert sorted(p.name for p in (out / name).iterdir())[0] == "part-00000.parquet", name
    assert info["stages"]["index"]["shards"] >= 1 and info["stages"]["mine"]["images"] == 120

    # a rerun with the same config reproduces the run; another config is refused without --overwrite
    first_table = table
    assert daf.main(_args(scene_corpus, out, stage)) == 0
    assert pq.read_table(out / "discrepancies.parquet").equals(first_table)
    assert daf.main(_args(scene_corpus, out, stage, "knn.k=5")) == 1
    assert "different config (differs at: knn.k)" in capsys.readouterr().err
    assert daf.main([*_args(scene_corpus, out, "knn.k=5"), "--overwrite"]) == 0


def test_daf_approximate_index_records_recall(tmp_path: Path, scene_corpus: str, ray_local: None) -> None:
    out = tmp_path / "run"
    assert daf.main(_args(scene_corpus, out, "knn.index=IVF8,Flat", "knn.nprobe=8")) == 0
    info = json.loads((out / "run.json").read_text())
    assert info["recall"]["probe"] == 1.0  # nprobe = nlist visits every list: exact
    assert info["stages"]["index"]["probe"]["index"] == "IVF8,Flat"


def test_daf_failure_names_the_stage(tmp_path: Path, scene_corpus: str, ray_local: None, capsys: pytest.CaptureFixture[str]) -> None:
    code = daf.main(_args(scene_corpus, tmp_path / "run", "models.probe=py:no_such_module:make"))
    assert code == 1
    err = capsys.readouterr().err
    assert "stage 'embed' failed" in err and "no_such_module" in err
    info = json.loads((tmp_path / "run" / "run.json").read_text())
    assert info["status"] == "failed in stage embed"


def test_bad_config_fails_before_work(tmp_path: Path) -> None:
    proc = subprocess.run(
        [sys.executable, str(ROOT / "jobs" / "daf.py"), "--config", str(ROOT / "configs" / "daf-tiny.yaml"),
         "knn.kay=3", f"output={tmp_path / 'x'}"],
        capture_output=True, text=True,
    )
    assert proc.returncode == 2 and "unknown key 'knn.kay'" in proc.stderr and "daf-tiny.yaml" in proc.stderr
    assert not (tmp_path / "x").exists()


def test_planted_colour_blind_spot_tops_the_ranking(tmp_path: Path, ray_local: None) -> None:
    """A probe blind to colour: the scenes whose nearest look-alike differs only in colour rank first.

    Every scene has a near-duplicate with its objects shifted a little (both models agree
    on those). A third of the scenes also have a colour twin: the reference finds the
    shifted copy closer, the colour-blind probe the twin. Those scenes must top the ranking.
    """
    from dataclasses import replace

    from clipscan.data.scenes import make_scene, render

    (tmp_path / "images").mkdir()
    rows, planted = [], set()

    def add(name: str, scene: object) -> None:
        render(scene, 64).save(tmp_path / "images" / f"{name}.jpg", quality=95)  # type: ignore[arg-type]
        rows.append({"id": name, "image": f"images/{name}.jpg", "caption": list(scene.captions)})  # type: ignore[attr-defined]

    for i in range(120):
        scene = make_scene(11, i, n_objects=2)
        shifted = replace(scene, objects=tuple(replace(o, x=min(o.x + 0.04, 0.95)) for o in scene.objects))
        add(f"g{i:03d}-base", scene)
        add(f"g{i:03d}-shifted", shifted)
        if i % 3 == 0:
            add(f"g{i:03d}-colour", make_scene(11, i, n_objects=2, twin=True))
            planted.add(f"g{i:03d}-base")
    manifest = tmp_path / "manifest.parquet"
    pq.write_table(pa.Table.from_pylist(rows), manifest)

    out = tmp_path / "run"
    assert daf.main(_args(str(manifest), out, "models.probe=py:tests.planted:colour_blind",
                          "models.reference=py:tests.planted:colour_seeing", "embed.image_size=64",
                          "mining.rank_by=overlap", "knn.k=1", "mining.pair_probe_min=0.9",
                          "mining.pair_reference_max=0.8")) == 0
    table = pq.read_table(out / "discrepancies.parquet")
    ranked = table.take(pc.sort_indices(table, sort_keys=[("overlap", "ascending"), ("gap", "descending"),
                                                          ("id", "ascending")])).column("id").to_pylist()
    top = ranked[: len(planted)]
    rate = len(planted.intersection(top)) / len(planted)
    chance = len(planted) / len(ranked)
    print(f"planted blind spot: {rate:.1%} of the top {len(planted)} are the planted scenes (chance {chance:.1%})")
    assert rate >= 0.75 and rate >= 4 * chance  # measured: 82.5% against 14.3% chance
    close = [p for p in pq.read_table(out / "pairs.parquet").to_pylist() if p["direction"] == "probe_close"]
    hits = [p for p in close if p["id_a"].endswith("-base") and p["id_b"] == p["id_a"][:4] + "-colour"]
    assert close and len(hits) / len(close) >= 0.9, close[:5]


def test_demo_config_finds_the_planted_colour_blind_spot(tmp_path: Path, ray_local: None) -> None:
    """``make demo``'s config: the colour-blind probe's report names colour first, as a planted check."""
    out = tmp_path / "run"
    assert daf.main(["--config", str(ROOT / "configs" / "daf-demo.yaml"), f"output={out}",
                     f"data.path={tmp_path / 'scenes' / 'manifest.parquet'}", "data.generate=400"]) == 0
    contrast = json.loads((out / "attributes.json").read_text())
    first = contrast["attributes"][0]
    print("demo:", first)
    assert first["name"] == "colour" and first["ci"][0] > 1 and contrast["planted_found"] is True
    html = (out / "report.html").read_text()
    assert "planted check of the method" in html and html.index("colour") < html.index('id="run"')


def test_daf_names_and_judges_failure_types_with_an_openai_server(tmp_path: Path, scene_corpus: str,
                                                                  ray_local: None) -> None:
    """Summary, then judge, through a scripted OpenAI-compatible server: failures.json carries the figures."""
    from tests.test_summarise import FakeOpenAI

    srv = FakeOpenAI([(200, '{"failures": [{"type": "Colour confusion", "description": "hue swapped"}]}'),
                      (200, '{"holds": false, "reason": "no"}')])
    try:
        out = tmp_path / "run"
        assert daf.main(_args(scene_corpus, out, "llm.backend=openai", f"llm.url={srv.url}", "llm.model=fake",
                              "llm.tokenizer=/nonexistent", "llm.judge_cases=4", "llm.retries=0")) == 0
    finally:
        srv.server.shutdown()
    failures = json.loads((out / "failures.json").read_text())
    assert failures["status"] == "done" and [t["type"] for t in failures["types"]] == ["Colour confusion"]
    judge = failures["types"][0]["judge"]
    assert failures["judge"]["status"] == "done" and judge["judged"] == judge["control_judged"] == 4
    assert judge["rate"] == judge["control_rate"] == 0.0 and judge["confirmed"] is False
    info = json.loads((out / "run.json").read_text())
    assert info["stages"]["judge"]["prompts"] == 8
    assert len(srv.requests) == failures["prompts"] + failures["retried"] + 8  # the summary's, then the judge's
    assert "unconfirmed" in (out / "report.html").read_text()


def test_a_key_repeated_across_webdataset_tars_is_settled_before_the_search(tmp_path: Path, ray_local: None) -> None:
    """Three tars, one key in two of them (two different images): the first one in input
    order is kept, the later one is skipped with where the key was first seen, and the
    discrepancies are the same bits for 1 and 3 shard actors and for the in-process search."""
    import io
    import tarfile

    from tests.corpora import jpeg

    root = tmp_path / "wds"
    root.mkdir()
    for s in range(3):
        with tarfile.open(root / f"shard-{s:05d}.tar", "w") as tar:
            keys = [f"s{s}-{i:03d}" for i in range(14)] + (["twice"] if s in (0, 2) else [])
            for j, key in enumerate(keys):
                for ext, data in (("jpg", jpeg(100 * s + j)), ("txt", f"a scene {s} {j}".encode())):
                    info = tarfile.TarInfo(f"{key}.{ext}")
                    info.size = len(data)
                    tar.addfile(info, io.BytesIO(data))
    tables = {}
    for label, extra in (("local", ()), ("one", ("knn.stage_min_rows=2", "knn.shards=1")),
                         ("three", ("knn.stage_min_rows=2", "knn.shards=3"))):
        out = tmp_path / label
        args = _args(str(root / "shard-{00000..00002}.tar"), out, "data.format=webdataset", "attributes.enabled=false",
                     *extra)
        assert daf.main(args) == 0, label
        info = json.loads((out / "run.json").read_text())
        assert info["counts"]["embedded"] == 43 and info["counts"]["skipped"] == 1
        skipped = pq.read_table(out / "skipped.parquet").to_pylist()
        assert [(r["id"], r["stage"]) for r in skipped] == [("twice", "repeats")]
        assert "shard-00002.tar" in skipped[0]["uri"] and "shard-00000.tar" in skipped[0]["reason"], skipped
        tables[label] = pq.read_table(out / "discrepancies.parquet")
        assert tables[label].column("id").to_pylist().count("twice") == 1
    assert tables["local"].equals(tables["one"]) and tables["local"].equals(tables["three"])


def test_a_small_job_runs_in_its_own_process_without_ray_and_matches_the_ray_run(
        tmp_path: Path, scene_corpus: str, ray_local: None) -> None:
    """Below ``knn.stage_min_rows`` a job started without a cluster never starts Ray: the
    embedding, search, mining and attribute contrast run in its process, with the same
    results as the same job run on Ray."""
    on_ray, here = tmp_path / "ray", tmp_path / "here"
    assert daf.main(_args(scene_corpus, on_ray, "knn.stage_min_rows=2")) == 0
    run_without_ray("daf", _args(scene_corpus, here))
    stages = json.loads((here / "run.json").read_text())["stages"]
    assert stages["embed"]["executor"] == stages["mine"]["executor"] == "local"
    assert json.loads((on_ray / "run.json").read_text())["stages"]["embed"]["executor"] == "ray"
    a = pq.read_table(here / "discrepancies.parquet").sort_by("id")
    b = pq.read_table(on_ray / "discrepancies.parquet").sort_by("id")
    assert a.num_rows == b.num_rows == 120
    for name in a.column_names:
        x, y = a.column(name).to_pylist(), b.column(name).to_pylist()
        if pa.types.is_floating(a.schema.field(name).type) or (
                pa.types.is_list(a.schema.field(name).type) and pa.types.is_floating(a.schema.field(name).type.value_type)):
            flat = [v for r in x for v in (r if isinstance(r, list) else [r])]
            other = [v for r in y for v in (r if isinstance(r, list) else [r])]
            assert len(flat) == len(other) and all(abs(p - q) <= 1e-5 for p, q in zip(flat, other, strict=True)), name
        else:
            assert x == y, name
    assert json.loads((here / "attributes.json").read_text())["attributes"] == \
        json.loads((on_ray / "attributes.json").read_text())["attributes"]
