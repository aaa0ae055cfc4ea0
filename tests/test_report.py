"""Tests for clipscan.report (the kit and DAF's page): a DAF report built from a real generated scene corpus."""

from __future__ import annotations

import base64
import io
import os
import re
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from clipscan.data.scenes import write_corpus
from clipscan.report.daf import daf_plots, write_daf_report
from clipscan.report.kit import (
    esc,
    figure_to_png,
    new_figure,
    page,
    png_data_uri,
    summary_table,
    thumbnail_data_uri,
)
from clipscan.stages.discrepancy import cases
from clipscan.stages.mine import Figures
from clipscan.stages.summarise.result import Failures
from tests.reference import mine

MALICIOUS = '<script>alert(1)</script>"}'
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
CHROMIUM = "/usr/bin/chromium"
N, K = 40, 5


def normalise(x: np.ndarray) -> np.ndarray:
    x = x - x.mean(axis=0)
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


def brute_knn(x: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    s = x.astype(np.float64) @ x.astype(np.float64).T
    np.fill_diagonal(s, -np.inf)
    order = np.argsort(-s, axis=1, kind="stable")[:, :k]
    return np.take_along_axis(s, order, axis=1).astype(np.float32), order.astype(np.int64)


@pytest.fixture(scope="module")
def run(tmp_path_factory) -> dict:
    """A 40-scene corpus, pixel-statistics embeddings standing in for the two models, and
    the DAF tables; scene 0 gets a hostile caption, scene 1 a uri that does not exist."""
    root = tmp_path_factory.mktemp("daf")
    corpus_dir = str(root / "corpus")
    write_corpus(corpus_dir, N, seed=3, size=96)
    manifest = pq.read_table(os.path.join(corpus_dir, "manifest.parquet"))
    uris = [os.path.join(corpus_dir, p) for p in manifest.column("image").to_pylist()]
    pixels = np.stack(
        [np.asarray(Image.open(u).convert("RGB").resize((16, 16)), np.float32) / 255 for u in uris]
    )
    # "probe": coarse colour layout; "reference": a random projection of the grey levels.
    x_probe = normalise(pixels.reshape(N, 4, 4, 4, 4, 3).mean(axis=(2, 4)).reshape(N, -1))
    proj = np.random.default_rng(0).normal(size=(256, 32))
    x_ref = normalise(pixels.mean(axis=3).reshape(N, -1) @ proj)
    probe_D, probe_I = brute_knn(x_probe, K)
    ref_D, ref_I = brute_knn(x_ref, 20)
    ids = np.array(manifest.column("id").to_pylist(), dtype=object)
    captions = manifest.column("caption").to_pylist()
    captions[0] = [MALICIOUS]
    uris[1] = os.path.join(corpus_dir, "images", "missing.jpg")
    corpus = pa.table(
        {
            "id": list(ids),
            "uri": uris,
            "caption": [max(c, key=len) for c in captions],
            "captions": captions,
        }
    )
    table = mine(ids, probe_D, probe_I, ref_D, ref_I, x_probe, x_ref, K)
    picked = cases(table, corpus, N)
    failures = Failures(
        "openai",
        [
            {
                "type": "Colour <b>confusion</b>",
                "description": MALICIOUS,
                "prompts": 3,
                "cases": 12,
                # the hostile caption and the missing image are shown whatever the ranking
                "examples": ["scene-000000", "scene-000001", "scene-000002"],
            }
        ],
        prompts=3,
        parsed=3,
    )
    summary = {
        "images": N,
        "skipped": 1,
        "models": {"probe": "tiny-clip", "reference": "tiny-dinov2"},
        "recall": 0.987,
        "wall_s": 3.25,
    }
    run_dir = str(root / "run")
    path = write_daf_report(
        run_dir, summary, table, picked, failures, rows=N, thumb=96, corpus=corpus
    )
    return {
        "root": root,
        "run_dir": run_dir,
        "path": path,
        "html": Path(path).read_text(encoding="utf-8"),
        "table": table,
        "cases": picked,
        "corpus": corpus,
        "summary": summary,
    }


def test_report_and_plots_are_written(run):
    assert run["path"] == os.path.join(run["run_dir"], "report.html")
    for name in ("overlap_hist.png", "cosines.png"):
        data = Path(run["run_dir"], "plots", name).read_bytes()
        assert data.startswith(PNG_MAGIC)
        assert png_data_uri(data) in run["html"]  # the same plot is embedded in the page
    assert not [p for p in os.listdir(run["run_dir"]) if ".tmp-" in p]


def test_report_embeds_thumbnails_and_figures(run):
    html = run["html"]
    assert html.startswith("<!DOCTYPE html>")
    thumbs = re.findall(r'src="data:image/jpeg;base64,([A-Za-z0-9+/=]+)"', html)
    assert len(thumbs) >= run["cases"].num_rows * 2
    image = Image.open(io.BytesIO(base64.b64decode(thumbs[0])))
    assert image.size == (96, 96)
    assert html.count('src="data:image/png;base64,') == 2
    for label in ("Images embedded", "tiny-clip", "tiny-dinov2", "0.987", "Mean overlap@k"):
        assert label in html
    # self-contained: every src and href is a data URI, nothing to fetch
    assert re.findall(r'(?:src|href)="(?!data:)', html) == []
    assert "<link" not in html


def test_untrusted_text_is_escaped(run):
    html = run["html"]
    assert "<script" not in html.lower()
    assert "&lt;script&gt;alert(1)&lt;/script&gt;&quot;}" in html
    assert "Colour &lt;b&gt;confusion&lt;/b&gt;" in html and "<b>confusion" not in html


def test_missing_image_gets_a_placeholder(run, tmp_path):
    assert "data:image/svg+xml;base64," in run["html"]
    for bad in (str(tmp_path / "nope.jpg"), b"", b"not an image", str(tmp_path)):
        uri = thumbnail_data_uri(bad, 64)
        assert uri.startswith("data:image/svg+xml;base64,")
        assert b"<svg" in base64.b64decode(uri.split(",", 1)[1])
    good = run["corpus"].column("uri")[2].as_py()
    uri = thumbnail_data_uri(good, 64)
    assert uri.startswith("data:image/jpeg;base64,")
    assert thumbnail_data_uri(Path(good).read_bytes(), 64) == uri


def test_failures_off_says_the_summary_was_not_run(run, tmp_path):
    for failures in (None, Failures.off()):
        out = tmp_path / ("none" if failures is None else "off")
        path = write_daf_report(
            str(out), {}, run["table"], run["cases"], failures, rows=3, thumb=64
        )
        html = Path(path).read_text()
        assert "LLM summary was not run" in html
        # without a corpus only the images named in the cases table get thumbnails
        assert html.count("data:image/jpeg;base64,") >= 3
        assert "k (neighbours per image)" in html


def test_empty_cases_render(run, tmp_path):
    path = write_daf_report(
        str(tmp_path), {}, run["table"], run["cases"].slice(0, 0), None, corpus=run["corpus"]
    )
    assert "No image has a probe-only neighbour" in Path(path).read_text()


def test_helpers():
    assert esc('<a href="x">\'&') == "&lt;a href=&quot;x&quot;&gt;&#x27;&amp;"
    assert esc(None) == ""
    table = summary_table({"a<b": 1234567, "nested": {"x": 0.123456, "y": None}, "ok": True})
    assert "a&lt;b" in table and "1,234,567" in table and "nested / x" in table
    assert "0.1235" in table and "<td>-</td>" in table and "yes" in table
    html = page("T <i>", ["<section>x</section>"])
    assert "<title>T &lt;i&gt;</title>" in html and "<script" not in html
    fig = new_figure(2, 2)
    fig.add_subplot().plot([0, 1], [0, 1])
    assert figure_to_png(fig).startswith(PNG_MAGIC)


def test_daf_plots(run):
    plots = daf_plots(run["table"], ("clip", "dino"))
    assert set(plots) == {"overlap_hist.png", "cosines.png"}
    for data in plots.values():
        image = Image.open(io.BytesIO(data))
        assert image.format == "PNG" and image.size[0] > 300


@pytest.mark.skipif(not os.path.exists(CHROMIUM), reason=f"{CHROMIUM} not installed")
def test_renders_in_headless_chromium(run, tmp_path):
    shot = tmp_path / "report.png"
    cmd = [
        shutil.which("chromium") or CHROMIUM,
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-quic",
        "--no-first-run",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        f"--user-data-dir={tmp_path / 'profile'}",
        f"--screenshot={shot}",
        "--window-size=1400,2000",
        f"file://{run['path']}",
    ]
    subprocess.run(cmd, check=True, capture_output=True, timeout=120)
    image = np.asarray(Image.open(shot).convert("RGB"))
    assert image.shape == (2000, 1400, 3)
    # a rendered page, not a blank one: many distinct colours from thumbnails and plots
    assert len(np.unique(image.reshape(-1, 3), axis=0)) > 500


def test_report_from_streaming_aggregates_equals_whole_table(run, tmp_path):
    """The pipeline hands the report its aggregates and only the shown rows: the same page."""
    shown = run["table"].filter(
        pa.compute.is_in(run["table"].column("id"), value_set=run["cases"].column("id").combine_chunks())
    )
    assert shown.num_rows < run["table"].num_rows
    figures = Figures.of_table(run["table"])
    assert figures.images == N and figures.k == K and int(figures.overlap_counts.sum()) == N
    assert figures.points["px"].size == N * K  # 40 x 5 points: all of them, below the sample bound
    path = write_daf_report(str(tmp_path), run["summary"], shown, run["cases"], None, rows=N, thumb=96,
                            corpus=run["corpus"], figures=figures)
    whole = write_daf_report(str(tmp_path / "whole"), run["summary"], run["table"], run["cases"], None,
                             rows=N, thumb=96, corpus=run["corpus"])
    assert Path(path).read_text() == Path(whole).read_text()
