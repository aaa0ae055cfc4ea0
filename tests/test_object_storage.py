"""The DAF and bias jobs against a real S3-compatible server on loopback (moto's server mode).

The corpus is read from ``s3://`` and the whole run directory (run.json, report.html,
Parquet tables, embeddings) is written there; the results must equal a run from local
disk. Ray's worker processes inherit the environment of the process that starts Ray, so
the endpoint and credentials go into ``os.environ`` when this module is imported: pytest
imports every test module before the session's ``ray_local`` fixture starts Ray. The
port is reserved then and handed to the server when the fixture starts it.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import time
from collections.abc import Iterator
from pathlib import Path

import pyarrow.fs as pafs
import pyarrow.parquet as pq
import pytest

from tests.conftest import load_job

ROOT = Path(__file__).resolve().parents[1]
BUCKET = "clipscan-test"

_reserved = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
_reserved.bind(("127.0.0.1", 0))
PORT = _reserved.getsockname()[1]
ENDPOINT = f"http://127.0.0.1:{PORT}"
S3_ENV = {
    "AWS_ENDPOINT_URL": ENDPOINT,  # pyarrow >= 15 and boto3 read it; AWS_ENDPOINT_URL_S3 for S3 only
    "AWS_ENDPOINT_URL_S3": ENDPOINT,
    "AWS_ACCESS_KEY_ID": "testing",
    "AWS_SECRET_ACCESS_KEY": "testing",
    "AWS_DEFAULT_REGION": "us-east-1",
    "AWS_REGION": "us-east-1",
    "AWS_EC2_METADATA_DISABLED": "true",  # no instance-metadata probe on a laptop
}
os.environ.update(S3_ENV)

daf = load_job("daf")  # the job script itself, run in-process


@pytest.fixture(scope="module")
def s3_server() -> Iterator[str]:
    """A moto S3 server on the reserved loopback port with an empty bucket; yields the endpoint."""
    import boto3
    from moto.server import ThreadedMotoServer

    logging.getLogger("werkzeug").setLevel(logging.ERROR)  # one log line per request otherwise
    _reserved.close()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=PORT, verbose=False)
    server.start()
    try:
        boto3.client("s3", endpoint_url=ENDPOINT).create_bucket(Bucket=BUCKET)
        yield ENDPOINT
    finally:
        server.stop()


@pytest.fixture(scope="module")
def local_corpus(tmp_path_factory: pytest.TempPathFactory) -> str:
    from clipscan.data.scenes import write_corpus

    return write_corpus(str(tmp_path_factory.mktemp("s3corpus") / "corpus"), 40, seed=11, size=64)


@pytest.fixture(scope="module")
def s3_corpus(s3_server: str, local_corpus: str) -> str:
    """The local corpus uploaded under ``s3://BUCKET/corpus/``; returns the manifest URI."""
    import boto3

    client = boto3.client("s3", endpoint_url=s3_server)
    root = Path(local_corpus).parent
    for path in sorted(root.rglob("*")):
        if path.is_file():
            client.upload_file(str(path), BUCKET, f"corpus/{path.relative_to(root).as_posix()}")
    return f"s3://{BUCKET}/corpus/manifest.parquet"


def _args(corpus: str, out: str, *extra: str) -> list[str]:
    return ["--config", str(ROOT / "configs" / "daf-tiny.yaml"), f"data.path={corpus}", f"output={out}",
            "data.generate=null", "embed.image_size=48", "mining.cases=10", "report.rows=5", *extra]


def _keys(prefix: str) -> set[str]:
    import boto3

    client = boto3.client("s3", endpoint_url=ENDPOINT)
    pages = client.get_paginator("list_objects_v2").paginate(Bucket=BUCKET, Prefix=prefix)
    return {obj["Key"][len(prefix):] for page in pages for obj in page.get("Contents", [])}


def test_workers_see_the_endpoint(s3_server: str, ray_local: None) -> None:
    """Guards the set-up: a Ray worker resolves s3:// to the loopback server, not to AWS."""
    import ray

    @ray.remote
    def endpoint() -> str | None:
        return os.environ.get("AWS_ENDPOINT_URL")

    assert ray.get(endpoint.remote()) == ENDPOINT, (
        "Ray was started before this module set AWS_ENDPOINT_URL; run the S3 tests in a session "
        "whose Ray starts after test collection"
    )


def test_daf_reads_and_writes_s3_and_matches_local(
    s3_corpus: str, local_corpus: str, tmp_path: Path, ray_local: None
) -> None:
    out = f"s3://{BUCKET}/runs/x"
    # on s3:// the sharded search stage and the manifest streamed; locally the in-process search, the manifest listed
    stage = ("knn.stage_min_rows=2", "data.stream_min_rows=1")
    assert daf.main(_args(s3_corpus, out, *stage)) == 0

    keys = _keys("runs/x/")
    for name in ("run.json", "report.html", "cases.parquet", "skipped.parquet", "failures.json",
                 "discrepancies.parquet/part-00000.parquet", "pairs.parquet/part-00000.parquet"):
        assert name in keys, f"{name} missing from {out}: {sorted(keys)}"
    for model in ("probe", "reference"):
        assert any(k.startswith(f"embeddings/{model}/part-") and k.endswith(".parquet") for k in keys)
    assert not any(k.startswith(("_rows/", "_search/")) for k in keys), "scratch rows left behind"

    fs, root = pafs.FileSystem.from_uri(out)
    info = json.loads(fs.open_input_stream(f"{root}/run.json").read())
    assert info["status"] == "done" and info["counts"]["read"] == 40 and info["stages"]["read"]["streamed"] is True
    assert info["counts"]["embedded"] + info["counts"]["skipped"] == 40
    html = fs.open_input_stream(f"{root}/report.html").read().decode()
    assert "data:image/png;base64" in html  # thumbnails were read back from s3://

    # the same command again finds the finished run on s3:// and reproduces it
    first = pq.read_table(f"{root}/discrepancies.parquet", filesystem=fs)
    assert daf.main(_args(s3_corpus, out, *stage)) == 0
    assert pq.read_table(f"{root}/discrepancies.parquet", filesystem=fs).equals(first)

    local = tmp_path / "local-run"
    assert daf.main(_args(local_corpus, str(local))) == 0
    assert info["stages"]["index"]["shards"] == 1 and json.loads((local / "run.json").read_text())[
        "stages"]["index"]["where"] == "local"
    for name in ("discrepancies.parquet", "pairs.parquet", "skipped.parquet"):  # both paths: the same bits
        remote = pq.read_table(f"{root}/{name}", filesystem=fs)
        assert remote.equals(pq.read_table(local / name)), name
    for name in ("cases.parquet", "corpus"):  # equal but for where each image was read from
        remote = pq.read_table(f"{root}/{name}", filesystem=fs)
        uris = [c for c in remote.column_names if "uri" in c]
        assert remote.drop_columns(uris).equals(pq.read_table(local / name).drop_columns(uris)), name
        assert remote.column("uri")[0].as_py().startswith(f"s3://{BUCKET}/corpus/images/"), name
    for model in ("probe", "reference"):
        remote = pq.read_table(f"{root}/embeddings/{model}", filesystem=fs).sort_by("id")
        assert remote.equals(pq.read_table(local / "embeddings" / model).sort_by("id")), model


def test_missing_s3_corpus_names_the_uri(s3_server: str, ray_local: None, tmp_path: Path,
                                         capsys: pytest.CaptureFixture[str]) -> None:
    uri = f"s3://{BUCKET}/nowhere/manifest.parquet"
    assert daf.main(_args(uri, str(tmp_path / "run"))) == 1
    assert uri in capsys.readouterr().err


def test_gs_uri_error_names_the_uri(tmp_path: Path, ray_local: None, monkeypatch: pytest.MonkeyPatch,
                                    capsys: pytest.CaptureFixture[str]) -> None:
    """No GCS server here: a gs:// corpus without credentials fails in seconds with one line naming the URI."""
    from clipscan import fs as cfs

    uri = "gs://clipscan-no-such-bucket/corpus/manifest.parquet"
    monkeypatch.setenv(cfs.GCS_RETRY_ENV, "1")  # pyarrow's own default would retry for 15 minutes
    monkeypatch.delenv("GOOGLE_APPLICATION_CREDENTIALS", raising=False)
    start = time.perf_counter()
    assert daf.main(_args(uri, str(tmp_path / "run"))) == 1
    line = [x for x in capsys.readouterr().err.splitlines() if x.startswith("error: ")][-1]
    assert uri in line and "cannot read" in line, line
    assert time.perf_counter() - start < 60


def test_fs_helpers_on_s3(s3_server: str) -> None:
    """clipscan.fs on s3://: atomic writes, listing as full URIs, errors that name the URI."""
    from clipscan import fs as cfs

    base = f"s3://{BUCKET}/fs-helpers"
    cfs.write_json_atomic(cfs.join(base, "a", "x.json"), {"n": 1})
    cfs.write_bytes_atomic(cfs.join(base, "a", "b", "y.parquet"), b"not really parquet")
    assert cfs.exists(cfs.join(base, "a", "x.json")) and not cfs.exists(cfs.join(base, "nope"))
    assert json.loads(cfs.read_bytes(cfs.join(base, "a", "x.json"))) == {"n": 1}
    assert cfs.list_files(base, ".parquet") == [f"{base}/a/b/y.parquet"]
    assert cfs.list_files(cfs.join(base, "a"), recursive=False) == [f"{base}/a/x.json"]
    assert cfs.list_files(cfs.join(base, "missing")) == []
    with pytest.raises(FileNotFoundError, match="fs-helpers/nope"):
        cfs.read_bytes(cfs.join(base, "nope"))
    with pytest.raises(OSError, match=f"s3://{BUCKET}-missing/x"):
        cfs.read_bytes(f"s3://{BUCKET}-missing/x")


def test_bias_writes_its_run_to_s3(s3_server: str, ray_local: None) -> None:
    bias = load_job("bias")
    args = ["--config", str(ROOT / "configs" / "bias-tiny.yaml"), "bias.objects=[2,3]", "bias.scenes=3",
            "bias.vocabulary=[red circle, green square, blue triangle, cyan star]",
            "bias.orders=2", "embed.image_size=48"]
    out = f"s3://{BUCKET}/runs/bias"
    assert bias.main([*args, f"output={out}"]) == 0
    keys = _keys("runs/bias/")
    for name in ("run.json", "report.html", "bias.json", "bias.parquet", "probe_set/manifest.parquet",
                 "probe_set/images/scene-2-000000.png"):
        assert name in keys, f"{name} missing from {out}"
    assert not any(k.startswith(("_rows/", "_captions/")) for k in keys), "scratch files left behind"
    fs, root = pafs.FileSystem.from_uri(out)
    models = json.loads(fs.open_input_stream(f"{root}/bias.json").read())["models"]
    assert set(models["open_clip:tiny-clip"]) == {"text_order", "image_size", "matching"}
    assert models["open_clip:tiny-clip"]["text_order"]["n"] == 6
    assert pq.read_table(f"{root}/bias.parquet", filesystem=fs).num_rows == 2 * 6
    html = fs.open_input_stream(f"{root}/report.html").read().decode()
    assert "data:image/jpeg;base64" in html  # probe scenes read back from s3://
