"""Real inputs: misbehaving decoders, decompression bombs, formats without a loader, COCO and
WebDataset as they are distributed. One bad file must never end a job."""

from __future__ import annotations

import io
import json
import threading
from functools import lru_cache
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
from PIL import Image

from clipscan.stages.decode import Decode, GuardedDecoder, SkipImage, decode_image, read_image_bytes
from tests import bombs, corpora, odd_files
from tests.conftest import ROOT, TINY_PROBE, TINY_REFERENCE, load_job

daf = load_job("daf")
MiB = 1024 * 1024
CAP_MB = 512  # the decoder's address-space limit in these tests


@lru_cache(maxsize=1)
def ico_bomb() -> bytes:
    """A 256 x 256 Windows icon whose embedded PNG is 8000 x 8000 RGBA zeros: 249 KB on disk.

    64 M pixels is under the default pixel limit, so only the memory limit stops it:
    decoded and converted it takes 1.25 GiB (measured, no limit).
    """
    return bombs.ico(bombs.png(8000, 8000))


BOMBS = {
    "png": (lambda: bombs.png(100_000, 100_000, full=False), "above the limit"),
    "gif": (bombs.gif, "above the limit"),
    "icns": (lambda: bombs.icns(bombs.png(20_000, 20_000, rgba=False, full=False)), "above the limit"),
    "ico": (ico_bomb, f"needs more than the {CAP_MB} MiB"),
}
MISBEHAVING = {
    "raise": (b"RAISE ", "decoder error: ExoticDecoderError: unheard-of pixel layout 7"),
    "hang": (b"HANG  ", "did not finish within 2 s"),
    "greedy": (b"GREEDY", f"needs more than the {CAP_MB} MiB"),
    "crash": (b"CRASH ", "died on signal SIGKILL"),
}


def test_misbehaving_decoders_become_skips_and_the_decoder_goes_on() -> None:
    decoder = GuardedDecoder(timeout_s=2, memory_mb=CAP_MB, plugins=("tests.bad_plugins",))
    try:
        for name, (magic, reason) in MISBEHAVING.items():
            with pytest.raises(SkipImage, match=reason):
                decoder.decode(magic + bytes(64), 16, 10**8)
            pixels, _ = decoder.decode(corpora.jpeg(1), 16, 10**8)  # the next image decodes
            assert pixels.shape == (16, 16, 3), name
        assert decoder.restarts == 3  # hang, greedy and crash each cost a fresh decoder process
        assert decoder.peak_rss_kb * 1024 < CAP_MB * MiB, decoder.peak_rss_kb
    finally:
        decoder.close()


def test_in_process_decode_still_catches_unknown_exceptions() -> None:
    stage = Decode(16, 10**8, plugins=["tests.bad_plugins"], isolate=False)
    out = stage({"id": np.array(["a", "b"], dtype=object), "uri": np.array(["", ""], dtype=object),
                 "skip_stage": np.array(["", ""], dtype=object), "skip_reason": np.array(["", ""], dtype=object),
                 "image_bytes": np.array([b"RAISE " + bytes(8), corpora.jpeg(0)], dtype=object)})
    assert list(out["skip_stage"]) == ["decode", ""]
    assert out["skip_reason"][0] == "decoder error: ExoticDecoderError: unheard-of pixel layout 7"


@pytest.mark.parametrize("kind", sorted(BOMBS))
def test_decompression_bombs_stay_under_the_memory_bound(kind: str) -> None:
    build, reason = BOMBS[kind]
    decoder = GuardedDecoder(timeout_s=30, memory_mb=CAP_MB)
    try:
        with pytest.raises(SkipImage, match=reason):
            decoder.decode(build(), 64, 89_478_485)
        peak = decoder.peak_rss_kb * 1024
        print(f"{kind} bomb: decoder peak RSS {peak / MiB:.0f} MiB under a {CAP_MB} MiB limit")
        assert peak < CAP_MB * MiB
    finally:
        decoder.close()


def test_without_the_memory_limit_the_icon_bomb_takes_over_a_gib() -> None:
    """The control: the bound above is the limit's doing (measured 1254 MiB without it, 297 MiB with)."""
    decoder = GuardedDecoder(timeout_s=60, memory_mb=None)
    try:
        decoder.decode(ico_bomb(), 64, 89_478_485)
        assert decoder.peak_rss_kb * 1024 > 1024 * MiB
    finally:
        decoder.close()


def test_pillow_guard_is_kept_and_follows_max_pixels() -> None:
    from PIL import Image as PILImage

    with pytest.raises(SkipImage, match="above the limit of 1000 pixels"):
        decode_image(bombs.icns(bombs.png(100, 100, full=False)), 16, 1000)  # 256 x 256 outside, larger inside
    assert PILImage.MAX_IMAGE_PIXELS is not None and PILImage.MAX_IMAGE_PIXELS <= 1000


@pytest.mark.parametrize("kind", sorted(odd_files.UNSUPPORTED))
def test_valid_files_without_a_loader_are_unsupported_not_corrupt(kind: str) -> None:
    with pytest.raises(SkipImage, match="^unsupported format"):
        decode_image(odd_files.UNSUPPORTED[kind](), 16, 10**8)


class PeakRss:
    """Largest resident set of any one process (this one and its descendants: Ray workers, decoders).

    ``peak`` over all of them with the ``name`` of the largest; ``decoder`` over the decoder
    processes alone.
    """

    def __init__(self) -> None:
        self.peak = 0
        self.name = ""
        self.decoder = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> PeakRss:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()

    def _run(self) -> None:
        import psutil

        me = psutil.Process()
        while not self._stop.wait(0.05):
            for proc in [me, *me.children(recursive=True)]:
                try:
                    rss = proc.memory_info().rss
                    cmd = " ".join(proc.cmdline())
                    if "clipscan.stages.decode import serve" in cmd:
                        self.decoder = max(self.decoder, rss)
                    if rss > self.peak:
                        self.peak, self.name = rss, cmd[:120]
                except (psutil.NoSuchProcess, psutil.AccessDenied):
                    continue


def _args(path: str | Path, out: Path, *extra: str) -> list[str]:
    return ["--config", str(ROOT / "configs" / "daf-tiny.yaml"), f"data.path={path}", f"output={out}",
            f"models.probe={TINY_PROBE}", f"models.reference={TINY_REFERENCE}", "embed.image_size=32",
            "mining.cases=5", "report.rows=5", "knn.k=3", "data.generate=null", *extra]


def _skipped(out: Path) -> dict[str, tuple[str, str]]:
    return {r["id"]: (r["stage"], r["reason"]) for r in pq.read_table(out / "skipped.parquet").to_pylist()}


def test_daf_job_runs_through_a_corpus_of_bad_files(tmp_path: Path, ray_local: None) -> None:
    """Every kind at once: exit 0, read = embedded + skipped, each skip with its true reason, no worker above the bound."""
    root = tmp_path / "corpus"
    (root / "img").mkdir(parents=True)
    files: dict[str, bytes] = {f"good{i}.jpg": corpora.jpeg(i) for i in range(6)}
    hopper = np.random.default_rng(9).integers(0, 256, size=(40, 40, 3), dtype=np.uint8)
    files["hopper.jpg"] = corpora.image_bytes(Image.fromarray(hopper), "JPEG")
    files["hopper.png"] = corpora.image_bytes(Image.fromarray(hopper), "PNG")
    files["sub/hopper.png"] = corpora.image_bytes(Image.fromarray(255 - hopper), "PNG")
    expected: dict[str, str] = {}
    for name, (magic, reason) in MISBEHAVING.items():
        files[f"{name}.img"] = magic + bytes(64)
        expected[f"img/{name}.img"] = reason.replace("2 s", "8 s")
    for name, (build, reason) in BOMBS.items():
        files[f"bomb.{name}"] = build()
        expected[f"img/bomb.{name}"] = reason
    for name, build in odd_files.UNSUPPORTED.items():
        files[f"odd-{name}.bin"] = build()
        expected[f"img/odd-{name}.bin"] = "unsupported format"
    lines = ["image,caption"]
    for name, data in files.items():
        (root / "img" / name).parent.mkdir(parents=True, exist_ok=True)
        (root / "img" / name).write_bytes(data)
        lines.append(f'img/{name},"a file called {name}"')
    (root / "manifest.csv").write_text("\n".join(lines) + "\n")

    out = tmp_path / "run"
    with PeakRss() as rss:
        code = daf.main(_args(root / "manifest.csv", out, "data.image_plugins=[tests.bad_plugins]",
                              "data.decode_timeout_s=8", f"data.decode_memory_mb={CAP_MB}", "data.rows_per_block=8"))
    assert code == 0
    info = json.loads((out / "run.json").read_text())
    counts = info["counts"]
    assert info["status"] == "done"
    assert counts["read"] == len(files) == counts["embedded"] + counts["skipped"]
    skipped = _skipped(out)
    for name, reason in expected.items():
        assert name in skipped and skipped[name][0] == "decode" and reason in skipped[name][1], (name, skipped.get(name))
    assert counts["embedded"] == len(files) - len(expected)  # the good ones, and all three hoppers
    ids = set(pq.read_table(out / "corpus").column("id").to_pylist())
    assert {"img/hopper.jpg", "img/hopper.png", "img/sub/hopper.png"} <= ids
    # uncapped, the icon bomb alone takes a decoder to 1.25 GiB; capped, no decoder passes the cap and
    # the largest process is the encoder actor (tiny models and torch: about 1 GiB measured)
    print(f"bad-file corpus: largest process {rss.peak / MiB:.0f} MiB ({rss.name}); "
          f"largest decoder {rss.decoder / MiB:.0f} MiB")
    assert 0 < rss.decoder < CAP_MB * MiB
    assert rss.peak < 1536 * MiB, rss.name


def test_coco_as_distributed(tmp_path: Path, ray_local: None) -> None:
    """``annotations/captions_val2017.json`` with ``val2017/`` beside ``annotations/``; an orphan annotation is counted."""
    root = tmp_path / "coco"
    (root / "annotations").mkdir(parents=True)
    (root / "val2017").mkdir()
    images, annotations = [], []
    for i in range(12):
        name = f"{i:012d}.jpg"
        (root / "val2017" / name).write_bytes(corpora.jpeg(i, size=40))
        images.append({"id": 100 + i, "file_name": name, "width": 40, "height": 40})
        annotations += [{"id": 10 * i + j, "image_id": 100 + i, "caption": f"coco {i} {j}"} for j in range(2)]
    annotations += [{"id": 999, "image_id": 555, "caption": "an image nobody listed"},
                    {"id": 998, "image_id": 555, "caption": "the same missing image"}]
    path = root / "annotations" / "captions_val2017.json"
    path.write_text(json.dumps({"info": {}, "licenses": [], "images": images, "annotations": annotations}))

    out = tmp_path / "run"
    assert daf.main(_args(path, out)) == 0
    info = json.loads((out / "run.json").read_text())
    assert info["counts"]["embedded"] == 12 and info["counts"]["skipped"] == 1
    assert info["stages"]["read"]["annotations_without_image"] == 2
    stage, reason = _skipped(out)["555"]
    assert stage == "read" and "2 caption annotation(s) for image_id 555" in reason


def _img2dataset_shards(root: Path, shards: int, per: int, seed: int = 0) -> None:
    """Shards as img2dataset writes them (``webdataset.TarWriter``): NNNNN.tar with key.jpg/.txt/.json."""
    import pyarrow as pa
    import webdataset as wds

    root.mkdir(parents=True, exist_ok=True)
    for s in range(shards):
        keys = []
        with wds.TarWriter(str(root / f"{s:05d}.tar")) as sink:
            for i in range(per):
                key = f"{s:05d}{i:04d}"
                caption = f"photo {key} seed {seed}"
                sink.write({"__key__": key, "jpg": corpora.jpeg(seed * 1000 + s * per + i, size=40), "txt": caption,
                            "json": {"key": key, "caption": caption, "url": f"http://x/{key}.jpg",
                                     "status": "success", "width": 40, "height": 40}})
                keys.append(key)
        pq.write_table(pa.table({"key": keys, "status": ["success"] * per}), root / f"{s:05d}.parquet")
        (root / f"{s:05d}_stats.json").write_text(json.dumps({"count": per, "successes": per}))


def test_webdataset_from_the_webdataset_library(tmp_path: Path, ray_local: None) -> None:
    """Numbered by (shard, member): read facts count the shards, reruns reuse them, a replaced shard is read again."""
    from clipscan.report.kit import placeholder_data_uri

    root = tmp_path / "wds"
    _img2dataset_shards(root, shards=3, per=8)
    out = tmp_path / "run"
    args = _args(f"{root}/{{00000..00002}}.tar", out, "data.rows_per_block=4")
    assert daf.main(args) == 0
    info = json.loads((out / "run.json").read_text())
    assert info["stages"]["read"]["shards"] == 3 and info["counts"]["embedded"] == 24
    corpus = pq.read_table(out / "corpus").to_pylist()
    first = next(r for r in corpus if r["id"] == "000000000")
    assert first["captions"] == ["photo 000000000 seed 0"]  # in .txt and .json: listed once
    assert first["uri"] == f"{root}/00000.tar#000000000.jpg"
    assert read_image_bytes(first["uri"]) == corpora.jpeg(0, size=40)
    html = (out / "report.html").read_text()
    assert "data:image/jpeg;base64" in html and placeholder_data_uri(128) not in html

    assert daf.main(args) == 0  # the same config again: every shard reused
    assert json.loads((out / "run.json").read_text())["stages"]["embed"]["shards_reused"] == 3
    _img2dataset_shards(tmp_path / "new", shards=2, per=8, seed=1)
    (tmp_path / "new" / "00001.tar").replace(root / "00001.tar")  # a replaced shard, same name
    assert daf.main(args) == 0
    info = json.loads((out / "run.json").read_text())
    assert info["stages"]["embed"]["shards_reused"] == 2 and info["counts"]["embedded"] == 24
    captions = {r["id"]: r["caption"] for r in pq.read_table(out / "corpus").to_pylist()}
    assert captions["000010000"] == "photo 000010000 seed 1"


def test_broken_shard_is_one_skipped_row(tmp_path: Path, ray_local: None) -> None:
    from clipscan.config import DataConfig
    from clipscan.data.corpus import read_corpus

    root = tmp_path / "wds"
    _img2dataset_shards(root, shards=2, per=4)
    import tarfile

    with tarfile.open(root / "00001.tar") as tar:
        cut = tar.getmember("000010002.jpg").offset_data + 100
    data = (root / "00001.tar").read_bytes()
    (root / "00001.tar").write_bytes(data[:cut])  # cut in the middle of the third image
    ds, info = read_corpus(DataConfig(path=str(root), format="webdataset"), records=str(tmp_path / "records"))
    rows = ds.take_all()
    assert info["shards"] == 2 and sorted({r["shard"] for r in rows}) == [0, 1]
    broken = [r for r in rows if r["skip_reason"].startswith("cannot read WebDataset shard")]
    assert len(broken) == 1 and "00001.tar after 2 samples" in broken[0]["skip_reason"], broken
    assert [r["row"] for r in rows if r["shard"] == 1] == list(range(len([r for r in rows if r["shard"] == 1])))


def test_repeated_key_on_the_command_line_is_refused(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    expanded = [f"data.path={tmp_path}/shard-{i:05d}.tar" for i in range(3)]  # the shell's brace expansion
    with pytest.raises(SystemExit) as exit_:
        daf.main(["--config", str(ROOT / "configs" / "daf-tiny.yaml"), *expanded, f"output={tmp_path / 'run'}"])
    assert exit_.value.code == 2
    err = capsys.readouterr().err
    assert "'data.path' is given more than once" in err and "quote it" in err
    assert not (tmp_path / "run").exists()


def test_failure_between_stages_is_recorded(tmp_path: Path, ray_local: None) -> None:
    root = tmp_path / "corpus"
    root.mkdir()
    for i in range(3):
        (root / f"{i}.jpg").write_bytes(b"not an image at all")
    (root / "manifest.csv").write_text("image,caption\n" + "".join(f"{i}.jpg,a caption\n" for i in range(3)))
    out = tmp_path / "run"
    assert daf.main(_args(root / "manifest.csv", out)) == 1
    info = json.loads((out / "run.json").read_text())
    assert info["status"] == "failed after stage embed"
    assert "only 0 images could be embedded" in info["error"]


def test_thumbnail_reads_a_tar_member(tmp_path: Path) -> None:
    _img2dataset_shards(tmp_path, shards=1, per=3)
    data = read_image_bytes(f"{tmp_path}/00000.tar#000000002.jpg")
    assert Image.open(io.BytesIO(data)).size == (40, 40)
    with pytest.raises(SkipImage, match="missing file: no member"):
        read_image_bytes(f"{tmp_path}/00000.tar#nope.jpg")


def test_resume_notices_an_edited_manifest_and_a_replaced_image(tmp_path: Path, ray_local: None) -> None:
    import os

    from clipscan.config import DafConfig, load_config
    from clipscan.rundir import Run
    from clipscan.runner import embed_corpus
    from clipscan.stages.embed import load_corpus, load_embeddings

    root = tmp_path / "corpus"
    root.mkdir()
    for i in range(12):
        (root / f"{i:02d}.jpg").write_bytes(corpora.jpeg(i, size=40))
    lines = ["image,caption", *[f"{i:02d}.jpg,caption {i}" for i in range(12)]]
    (root / "manifest.csv").write_text("\n".join(lines) + "\n")
    cfg = load_config(DafConfig, None, [f"data.path={root / 'manifest.csv'}", f"output={tmp_path / 'run'}",
                                        f"models.probe={TINY_PROBE}", f"models.reference={TINY_REFERENCE}",
                                        "embed.image_size=32", "data.rows_per_block=4"])
    models = {"probe": TINY_PROBE, "reference": TINY_REFERENCE}

    def embed() -> dict[str, object]:
        return embed_corpus(Run(cfg.output, "test", cfg), cfg, models)

    assert embed()["shards_reused"] == 0
    _, before = load_embeddings(cfg.output, "probe")
    assert embed()["shards_reused"] == 3  # nothing changed
    lines[2] = "01.jpg,an edited caption"  # shard 0
    (root / "manifest.csv").write_text("\n".join(lines) + "\n")
    (root / "10.jpg").write_bytes(corpora.jpeg(99, size=40))  # shard 2: same name, other pixels
    os.utime(root / "10.jpg", ns=(10**18, 10**18))
    counts = embed()
    assert counts["shards_reused"] == 1 and counts["embedded"] == 12
    captions = dict(zip(*(load_corpus(cfg.output).column(c).to_pylist() for c in ("id", "caption")), strict=True))
    assert captions["01.jpg"] == "an edited caption"
    ids, after = load_embeddings(cfg.output, "probe")
    changed = {str(i) for i, a, b in zip(ids, before, after, strict=True) if not np.allclose(a, b)}
    assert changed == {"10.jpg"}


def test_files_larger_than_the_decoder_may_hold_are_not_read(tmp_path: Path) -> None:
    from clipscan.data.read import _wds_samples, wds_sample_row

    big = tmp_path / "big.jpg"
    big.write_bytes(corpora.jpeg(0) + bytes(300 * MiB))
    stage = Decode(16, 10**8, memory_mb=256)
    out = stage({"id": np.array(["big"], dtype=object), "uri": np.array([str(big)], dtype=object),
                 "skip_stage": np.array([""], dtype=object), "skip_reason": np.array([""], dtype=object)})
    assert out["skip_reason"][0] == "file is 300 MiB, more than the decoder's 256 MiB (data.decode_memory_mb)"
    import tarfile

    with tarfile.open(tmp_path / "s.tar", "w") as tar:
        for name, data in (("a.jpg", corpora.jpeg(1)), ("a.txt", b"fine"), ("b.jpg", big.read_bytes()), ("b.txt", b"x")):
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    rows = [wds_sample_row(k, m, "s.tar")[0] for k, m in _wds_samples(str(tmp_path / "s.tar"), 256 * MiB)]
    assert [(r.id, r.skip) for r in rows] == [
        ("a", ""), ("b", "member b.jpg is 300 MiB, more than the decoder's 256 MiB (data.decode_memory_mb)")]
