"""``bias.json`` figures and the probe set in; ``plots/bias_*.png`` and a self-contained ``report.html`` out.

A thin page on the shared report kit (``clipscan.report.kit``): one table per bias with one
row per model (share and 95 % interval per position or size rank, the chance level in
the last row), a bar plot of each with its chance level, the matching drop, and a few
probe scenes with their captions. Captions are escaped.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import pyarrow as pa

from clipscan import fs as cfs
from clipscan.report.kit import (
    Thumbs,
    card,
    esc,
    figure_html,
    figure_to_png,
    new_figure,
    page,
    png_data_uri,
    section,
    summary_table,
)

EXAMPLES = 8  # probe scenes shown


def _pct(x: float) -> str:
    return f"{100 * x:.1f}"


def share_table(rows: Mapping[str, Mapping[str, Any]], chance: Sequence[float], label: str,
                scenes: Sequence[int] = ()) -> str:
    """Models x positions: ``share % [lo, hi]``; then the chance level and the scenes behind each position."""
    width = len(chance)
    head = "".join(f"<th>{esc(label)} {p + 1}</th>" for p in range(width))
    body = []
    for model, fig in rows.items():
        cells = "".join(
            f"<td>{_pct(s)} <span class='note'>[{_pct(lo)}, {_pct(hi)}]</span></td>"
            for s, (lo, hi) in zip(fig["share"], fig["ci"], strict=True)
        )
        body.append(f"<tr><th>{esc(model)}</th>{cells}<td>{int(fig['n'])}</td></tr>")
    body.append("<tr><th>chance</th>" + "".join(f"<td>{_pct(c)}</td>" for c in chance) + "<td></td></tr>")
    if scenes:
        body.append("<tr><th>scenes with the position</th>" + "".join(f"<td>{int(n)}</td>" for n in scenes)
                    + "<td></td></tr>")
    return (f'<table class="summary"><tr><th>model</th>{head}<th>scenes</th></tr>'
            + "".join(body) + "</table>")


def share_plot(rows: Mapping[str, Mapping[str, Any]], chance: Sequence[float], label: str, title: str) -> bytes:
    """Grouped bars per position / rank, one colour per model, 95 % intervals, chance as a dashed step."""
    import numpy as np

    fig = new_figure(7.2, 4.0)
    ax = fig.add_subplot(1, 1, 1)
    width = len(chance)
    x = np.arange(width)
    bar = 0.8 / max(len(rows), 1)
    for i, (model, f) in enumerate(rows.items()):
        share = np.asarray(f["share"]) * 100
        ci = np.asarray(f["ci"]) * 100
        err = np.clip(np.stack([share - ci[:, 0], ci[:, 1] - share]), 0, None)  # rounding can put a share a hair outside
        ax.bar(x - 0.4 + bar * (i + 0.5), share, bar, yerr=err, capsize=3, label=model)
    ax.step(np.r_[x - 0.5, width - 0.5], np.r_[np.asarray(chance) * 100, chance[-1] * 100], where="post",
            color="black", linestyle="--", linewidth=1, label="chance")
    ax.set_xticks(x, [f"{label} {p + 1}" for p in range(width)])
    ax.set_ylabel("first retrievals, % (mean over scenes)")
    ax.set_title(title)
    ax.legend(fontsize=7)
    return figure_to_png(fig)


def matching_plot(rows: Mapping[str, Mapping[str, Any]], extra: Mapping[str, Mapping[str, Any]]) -> bytes:
    import numpy as np

    fig = new_figure(6.4, 3.6)
    ax = fig.add_subplot(1, 1, 1)
    models = list(rows)
    x = np.arange(len(models))
    for off, key, ci_key in ((-0.2, "largest_first", "ci_first"), (0.2, "largest_last", "ci_last")):
        share = np.array([rows[m][key] for m in models]) * 100
        ci = np.array([extra[m][ci_key] for m in models]) * 100
        ax.bar(x + off, share, 0.4, yerr=np.clip(np.stack([share - ci[:, 0], ci[:, 1] - share]), 0, None), capsize=3,
               label=key.replace("_", " "))
    for i, m in enumerate(models):
        ax.hlines(extra[m]["chance"] * 100, i - 0.4, i + 0.4, colors="black", linestyles="--", linewidth=1)
    ax.set_xticks(x, [m if len(m) < 28 else m[:25] + "..." for m in models], fontsize=7)
    ax.set_ylabel("matching accuracy %")
    ax.set_title("image-text matching (dashed: chance)")
    ax.legend(fontsize=7)
    return figure_to_png(fig)


def write_bias_report(run_dir: str, overview: Mapping[str, Any], result: Mapping[str, Any],
                      summary: Mapping[str, Mapping[str, Any]], scenes: pa.Table, captions: pa.Table,
                      width: int, thumb: int = 128) -> str:
    """Write ``plots/bias_text_order.png``, ``plots/bias_image_size.png``, ``plots/bias_matching.png``
    (those that have data) and ``report.html`` under ``run_dir``; return the report's path.

    result: ``bias.json``; summary: run.json's ``bias_summary`` (chance levels per model);
    scenes, captions: the probe set's tables, for the examples.
    """
    models = result["models"]
    sections = [section("Run", summary_table(dict(overview)), "run")]
    text_rows = {m: f["text_order"] for m, f in models.items() if "text_order" in f}
    image_rows = {m: f["image_size"] for m, f in models.items()}
    caption_rows = {m: f["image_size"]["caption"] for m, f in models.items() if "caption" in f["image_size"]}
    any_model = next(iter(summary))
    chance = summary[any_model]["image_size"]["chance"]  # the same probe set for every model
    scenes_at = summary[any_model]["image_size"]["scenes"]

    def plot(name: str, png: bytes, caption: str) -> str:
        path = cfs.join(run_dir, "plots", f"{name}.png")
        cfs.write_bytes_atomic(path, png)
        return figure_html(png_data_uri(png), caption, name)

    if text_rows:
        sections.append(section("Text-order bias", (
            "<p>Each caption names a scene's objects in one order; its text embedding retrieves the nearest "
            "single-object caption. Share of captions whose first retrieval is the object named at each position "
            "(mean over scenes with that many objects; 95 % interval over scenes). A model without the bias sits "
            "at chance (1 / objects).</p>"
            + share_table(text_rows, chance, "position", scenes_at)
            + plot("bias_text_order", share_plot(text_rows, chance, "position", "text-order bias"),
                   "First retrieval by position in the caption; dashed: chance")
        ), "text-order"))
    body = ("<p>Each scene's image embedding retrieves the nearest single-object image; share of scenes whose "
            "first retrieval is the object of each size rank (1 = largest).</p>"
            + share_table(image_rows, chance, "size rank", scenes_at)
            + plot("bias_image_size", share_plot(image_rows, chance, "size rank", "image-size bias (image retrieval)"),
                   "First retrieval by size rank; dashed: chance"))
    if caption_rows:
        body += ("<p>The same image against the single-object captions (models with a text tower).</p>"
                 + share_table(caption_rows, chance, "size rank", scenes_at))
    sections.append(section("Image-size bias", body, "image-size"))
    match_rows = {m: f["matching"] for m, f in models.items() if "matching" in f}
    if match_rows:
        extra = {m: summary[m]["matching"] for m in match_rows}
        table = "".join(
            f"<tr><th>{esc(m)}</th><td>{_pct(f['largest_first'])}</td><td>{_pct(f['largest_last'])}</td>"
            f"<td>{_pct(f['largest_first'] - f['largest_last'])}</td><td>{_pct(extra[m]['chance'])}</td>"
            f"<td>{int(f['n'])}</td></tr>"
            for m, f in match_rows.items()
        )
        sections.append(section("Matching drop", (
            "<p>Image-text matching: the scene's image against its true caption and the captions of other scenes "
            "with the same object count, in the same order rule. Accuracy when the caption names the largest object "
            "first against last.</p>"
            '<table class="summary"><tr><th>model</th><th>largest first %</th><th>largest last %</th>'
            f"<th>drop (points)</th><th>chance %</th><th>scenes</th></tr>{table}</table>"
            + plot("bias_matching", matching_plot(match_rows, extra), "Matching accuracy; dashed: chance")
        ), "matching"))
    sections.append(section("Probe scenes", _examples(run_dir, scenes, captions, thumb), "examples"))
    path = cfs.join(run_dir, "report.html")
    cfs.write_bytes_atomic(path, page("clipscan bias probes (ComCO)", sections, thumb=thumb).encode("utf-8"))
    return path


def _examples(run_dir: str, scenes: pa.Table, captions: pa.Table, thumb: int) -> str:
    """The first scene of each object count with its largest-first caption."""
    thumbs = Thumbs(thumb)
    firsts: dict[int, str] = {}
    for ident, n in zip(scenes.column("id").to_pylist(), scenes.column("n_objects").to_pylist(), strict=True):
        firsts.setdefault(int(n), ident)
    text = {s: t for s, k, t in zip(captions.column("scene").to_pylist(), captions.column("kind").to_pylist(),
                                    captions.column("text").to_pylist(), strict=True) if k == "largest_first"}
    cards = [card(thumbs(cfs.join(run_dir, "probe_set", "images", f"{i}.png")), text.get(i), i)
             for i in list(firsts.values())[:EXAMPLES]]
    return '<div class="strip">' + "".join(cards) + "</div>"
