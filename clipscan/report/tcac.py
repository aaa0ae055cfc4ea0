"""TCAC results in (``tcac.parquet`` rows, per-transform summary); ``plots/changes_<transform>.png`` and a self-contained ``report.html`` out.

Per transform: the change-count distribution, the figures of ``run.json``'s
``tcac_summary`` and the images whose top-k captions moved most, each with the original
and the transformed thumbnail (re-rendered from the same seeded transform, at the size
the probe saw) and both top-k lists, captions that left or entered marked. Captions are
corpus text and are escaped everywhere; the page loads nothing from the network.
"""

from __future__ import annotations

import base64
import io
import re
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

import numpy as np

from clipscan import fs as cfs
from clipscan.report.kit import (
    CSS,
    THUMB_MAX_PIXELS,
    esc,
    figure_html,
    figure_to_png,
    new_figure,
    page,
    placeholder_data_uri,
    png_data_uri,
    section,
    summary_table,
)
from clipscan.stages.summarise.result import OFF_NOTE, Failures

if TYPE_CHECKING:
    from clipscan.stages.tcac.figures import Figures

TCAC_CSS = """
.tcase { display: grid; grid-template-columns: calc(var(--thumb) * 2 + 12px) minmax(0, 1fr) minmax(0, 1fr);
         gap: 18px; }
.tcase + .tcase { border-top: 1px solid var(--line); margin-top: 16px; padding-top: 16px; }
.pair { display: flex; gap: 12px; flex-wrap: wrap; }
.pair figure { width: var(--thumb); }
.pair img { width: var(--thumb); height: var(--thumb); object-fit: cover; border-radius: 6px; border: 0; }
.pair figcaption { margin-top: 2px; }
.tlist { margin: 0; padding-left: 26px; font-size: 13px; line-height: 1.35; }
.tlist li { margin: 0 0 3px; overflow-wrap: anywhere; }
.tlist .p { font: 11.5px/1.3 ui-monospace, "SFMono-Regular", Menlo, Consolas, monospace; color: var(--muted);
            margin-left: 6px; white-space: nowrap; }
.tlist li.left { color: var(--bad); text-decoration: line-through; text-decoration-thickness: 1px; }
.tlist li.entered { color: var(--ok); font-weight: 600; }
.tlist li.own::after { content: " \\2605"; color: #9a6700; }
.facts { font-size: 12.5px; color: var(--muted); margin-top: 6px; }
table.grid { border-collapse: collapse; font-variant-numeric: tabular-nums; }
table.grid th, table.grid td { padding: 5px 14px 5px 0; border-bottom: 1px solid #eef1f4; text-align: right; }
table.grid th:first-child, table.grid td:first-child { text-align: left; }
table.grid th { color: var(--muted); font-weight: 600; }
.small-plot { max-width: 520px; }
"""

_LABELS = {
    "images": "Images scored",
    "skipped": "Images skipped",
    "probe": "Probe model",
    "captions": "Distinct captions",
    "mean_pool": "Mean pool size (captions per image)",
    "transforms": "Transforms",
    "top": "k (captions listed before and after)",
    "wall_s": "Wall time (s)",
}


def change_histogram(counts: np.ndarray, top: int, name: str) -> bytes:
    """PNG of how many images had each change count 0..top under one transform (counts: (top + 1,))."""
    counts = np.asarray(counts, dtype=np.int64)
    images = int(counts.sum())
    fig = new_figure(5.2, 3.2)
    ax = fig.add_subplot()
    ax.bar(np.arange(top + 1), counts, width=0.8, color="#1f6feb")
    if images:
        mean = float((counts * np.arange(top + 1)).sum() / images)
        ax.axvline(mean, color="#cf222e", linestyle="--", linewidth=1.2, label=f"mean {mean:.2f}")
        ax.legend(loc="upper right", frameon=False)
    ax.set_xticks(np.arange(top + 1))
    ax.set_xlabel(f"change count: captions new to the top {top}")
    ax.set_ylabel("images")
    ax.set_title(f"{name}: change count per image ({images:,} images)")
    return figure_to_png(fig)


def _safe_name(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", name) or "transform"


class Renderer:
    """Thumbnails of an image and of its seeded transforms, as the probe saw them.

    Each image is read and decoded once at ``image_size`` (``decode_image``, as in the
    job), transformed with ``SeededTransforms`` and shrunk to ``thumb`` px for display.
    """

    def __init__(self, transforms: Mapping[str, Mapping[str, Any]], seed: int, image_size: int,
                 max_pixels: int, thumb: int) -> None:
        from clipscan.stages.transforms import SeededTransforms

        self.transforms = SeededTransforms(transforms, seed)
        self.size = image_size
        self.max_pixels = min(max_pixels, THUMB_MAX_PIXELS)
        self.thumb = thumb
        self._pixels: dict[str, np.ndarray | None] = {}
        self._original: dict[str, str] = {}

    def _decoded(self, uri: str) -> np.ndarray | None:
        if uri not in self._pixels:
            from clipscan.stages.decode import decode_image, read_image_bytes

            try:
                self._pixels[uri], _ = decode_image(read_image_bytes(uri), self.size, self.max_pixels)
            except Exception:  # the report shows what it can; the run's skip list has the reason
                self._pixels[uri] = None
        return self._pixels[uri]

    def _uri(self, pixels: np.ndarray) -> str:
        from PIL import Image

        img = Image.fromarray(pixels, "RGB")
        if img.size != (self.thumb, self.thumb):
            img = img.resize((self.thumb, self.thumb), Image.Resampling.BICUBIC)
        buf = io.BytesIO()
        img.save(buf, "JPEG", quality=85, optimize=True)
        return "data:image/jpeg;base64," + base64.b64encode(buf.getvalue()).decode("ascii")

    def original(self, uri: str) -> str:
        if uri not in self._original:
            pixels = self._decoded(uri)
            self._original[uri] = placeholder_data_uri(self.thumb) if pixels is None else self._uri(pixels)
        return self._original[uri]

    def transformed(self, uri: str, image_id: str, name: str) -> str:
        pixels = self._decoded(uri)
        if pixels is None:
            return placeholder_data_uri(self.thumb)
        return self._uri(self.transforms.apply(pixels, image_id, name))


def _top_list(captions: Sequence[str], probs: Sequence[float], other: set[str], own: set[str], mark: str) -> str:
    items = []
    for text, p in zip(captions, probs, strict=True):
        cls = [mark] if text not in other else []
        if text in own:
            cls.append("own")
        attr = f' class="{" ".join(cls)}"' if cls else ""
        items.append(f'<li{attr}>{esc(text)}<span class="p">{p:.3f}</span></li>')
    return f'<ol class="tlist">{"".join(items)}</ol>'


def case_html(row: Mapping[str, Any], renderer: Renderer, top: int) -> str:
    """One image under one transform: both thumbnails, facts, and both top-k lists."""
    before, after = list(row["top_before"]), list(row["top_after"])
    own = set(row["own_captions"] or [])
    uri, ident, name = row["uri"] or "", row["id"], row["transform"]
    facts = (
        f'changed {row["changed"]}/{min(top, len(before))} · own rank '
        f'{row["own_rank_before"]} → {row["own_rank_after"]} · KL {row["kl"]:.4f} · pool {row["pool_size"]}'
    )
    return (
        '<div class="tcase"><div>'
        '<div class="pair">'
        f'<figure><img src="{renderer.original(uri)}" alt="{esc(ident)}" title="{esc(row["caption"])}">'
        "<figcaption>original</figcaption></figure>"
        f'<figure><img src="{renderer.transformed(uri, ident, name)}" alt="{esc(ident)} {esc(name)}">'
        f"<figcaption>{esc(name)}</figcaption></figure></div>"
        f'<div class="id">{esc(ident)}</div>'
        f'<div class="caption" title="{esc(row["caption"])}">{esc(row["caption"])}</div>'
        f'<div class="facts">{esc(facts)}</div></div>'
        f'<div><div class="strip-title">Top {len(before)} before</div>'
        f'{_top_list(before, row["p_before"], set(after), own, "left")}</div>'
        f'<div><div class="strip-title">Top {len(after)} after {esc(name)}</div>'
        f'{_top_list(after, row["p_after"], set(before), own, "entered")}</div>'
        "</div>"
    )


def _summary_grid(summary: Mapping[str, Mapping[str, Any]], top: int) -> str:
    cols = [
        ("images", "images"), ("mean_changed", "mean change count"), ("share_changed", "share changed"),
        ("own_left_top1", "own caption leaves top 1"), (f"own_left_top{top}", f"own caption leaves top {top}"),
        ("own_top1_before", "own top 1 before"), ("own_top1_after", "own top 1 after"), ("mean_kl", "mean KL"),
    ]
    head = "<tr><th>transform</th>" + "".join(f"<th>{esc(label)}</th>" for _, label in cols) + "</tr>"
    rows = []
    for name, figures in summary.items():
        cells = []
        for key, _ in cols:
            value = figures.get(key)
            if isinstance(value, float):
                text = f"{value:.1%}" if key.startswith(("share", "own")) else f"{value:.4g}"
            else:
                text = "-" if value is None else f"{value:,}"
            cells.append(f"<td>{esc(text)}</td>")
        rows.append(f'<tr><td><a href="#t-{esc(_safe_name(name))}">{esc(name)}</a></td>{"".join(cells)}</tr>')
    return f'<table class="grid">{head}{"".join(rows)}</table>'


def write_tcac_report(
    run_dir: str,
    overview: Mapping[str, Any],
    summary: Mapping[str, Mapping[str, Any]],
    figures: Figures,
    transforms: Mapping[str, Mapping[str, Any]],
    seed: int,
    image_size: int,
    max_pixels: int,
    top: int = 10,
    images: int = 100,
    thumb: int = 128,
    failures: Mapping[str, Failures] | None = None,
) -> str:
    """Write ``plots/changes_<transform>.png`` and ``report.html`` under ``run_dir``; return the report's path.

    overview: figures of the run (``images``, ``skipped``, ``probe``, ... get labels);
    summary: ``Figures.summary``'s per-transform figures; figures: ``tcac.parquet``'s
    histograms and largest changes (``clipscan.stages.tcac.figures.Figures``); transforms, seed, image_size, max_pixels: the job's, to re-render
    the transformed thumbnails; images: cases shown per transform.
    """
    from clipscan.stages.tcac.figures import largest_changes

    renderer = Renderer(transforms, seed, image_size, max_pixels, thumb)
    labelled = {_LABELS.get(k, k.replace("_", " ")): v for k, v in overview.items()}
    sections = [
        section("Run", summary_table(labelled), "run"),
        section(
            "Per transform",
            _summary_grid(summary, top)
            + '<p class="note">Change count: how many of the top '
            f"{top} captions after the transform were not in the top {top} before. "
            "Own caption: the best-ranked of the image's own captions. Shares are over all scored images.</p>",
            "summary",
        ),
    ]
    sections.append(section("Failure types", _failures_html(failures), "failures"))
    legend = (
        '<p class="note legend"><span><span class="swatch" style="background:#cf222e"></span>left the top list</span>'
        '<span><span class="swatch" style="background:#1a7f37"></span>entered the top list</span>'
        "<span>\u2605 one of the image's own captions</span><span>numbers: zero-shot probability over the pool</span></p>"
    )
    for name in transforms:
        counts = figures.counts[figures.transforms.index(name)][: top + 1]
        png = change_histogram(counts, top, name)
        cfs.write_bytes_atomic(cfs.join(run_dir, "plots", f"changes_{_safe_name(name)}.png"), png)
        cases = largest_changes(figures.largest, name, images).to_pylist()
        body = (
            f'<div class="small-plot">{figure_html(png_data_uri(png), f"Change count per image under {name}.", f"{name} change counts")}</div>'
            + f'<h3 style="margin-top:16px">The {len(cases)} images whose top {top} changed most</h3>'
            + legend
            + ("".join(case_html(c, renderer, top) for c in cases) or '<p class="muted">No image was scored.</p>')
        )
        sections.append(section(f"Transform: {name}", body, f"t-{_safe_name(name)}"))
    title = f"TCAC: {overview.get('probe', 'probe')} under {len(transforms)} transforms"
    path = cfs.join(run_dir, "report.html")
    cfs.write_bytes_atomic(path, page(title, sections, css=CSS + TCAC_CSS, thumb=thumb).encode("utf-8"))
    return path


def _failures_html(failures: Mapping[str, Failures] | None) -> str:
    """The LLM's failure types per transform, or the line saying why there are none."""
    if not failures or all(f.status == "off" for f in failures.values()):
        return f'<p class="muted">{esc(OFF_NOTE)}</p>'
    parts = []
    for name, result in failures.items():
        items = "".join(
            f"<li><b>{esc(t.get('type', ''))}</b>: {esc(t.get('description', ''))} "
            f'<span class="muted">({t.get("prompts", 0)} prompts, {t.get("cases", 0)} cases)</span></li>'
            for t in result.types
        ) or f'<li class="muted">{esc(result.note())}</li>'
        parts.append(f"<h3>{esc(name)}</h3><ul>{items}</ul>")
    return "".join(parts)
