"""Run tables, figures and image URIs in; a self-contained ``report.html`` (inline CSS, data-URI images) and PNG plots out.

The HTML helpers (``esc``, ``thumbnail_data_uri``, ``Thumbs``, ``card``, ``section``,
``summary_table``, ``page``, ``figure_to_png``) are shared by the DAF and TCAC
reports; ``daf_plots`` and ``write_daf_report`` build the DAF one. Pages need no network
and no JavaScript. Captions and ids come from user data and are escaped everywhere.
"""

from __future__ import annotations

import base64
import html
import io
import math
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from clipscan import __version__
from clipscan import fs as cfs
from clipscan.stages.mine import Figures
from clipscan.stages.summarise.result import Failures

# Thumbnails refuse images above this many pixels before decoding (decompression bombs).
THUMB_MAX_PIXELS = 1 << 27

CSS = """
:root { --thumb: 128px; --ink: #1f2328; --muted: #59636e; --line: #d8dee4;
        --probe: #1f6feb; --ref: #bc4c00; --bad: #cf222e; --ok: #1a7f37; }
* { box-sizing: border-box; }
body { margin: 0; background: #f3f4f6; color: var(--ink);
       font: 15px/1.45 system-ui, -apple-system, "Segoe UI", Roboto, "Helvetica Neue",
             "DejaVu Sans", Arial, sans-serif; }
main { max-width: 1400px; margin: 0 auto; padding: 24px 28px 48px; }
h1 { font-size: 26px; margin: 4px 0 18px; }
h2 { font-size: 20px; margin: 0 0 12px; }
h3 { font-size: 16px; margin: 0 0 4px; }
section { background: #fff; border: 1px solid var(--line); border-radius: 10px;
          padding: 18px 20px; margin: 0 0 20px; }
p { margin: 0 0 8px; }
.muted { color: var(--muted); }
.note { color: var(--muted); font-size: 13px; }
table.summary { border-collapse: collapse; min-width: 420px; }
table.summary th, table.summary td { text-align: left; padding: 5px 16px 5px 0;
          border-bottom: 1px solid #eef1f4; vertical-align: top; }
table.summary th { font-weight: 600; color: var(--muted); white-space: nowrap; }
table.summary td { font-variant-numeric: tabular-nums; overflow-wrap: anywhere; }
.plots { display: grid; grid-template-columns: repeat(auto-fit, minmax(420px, 1fr)); gap: 16px; }
figure { margin: 0; }
figure img { width: 100%; height: auto; border: 1px solid #eef1f4; border-radius: 6px; }
figcaption { font-size: 13px; color: var(--muted); margin-top: 4px; }
.case { display: grid; grid-template-columns: calc(var(--thumb) * 1.6 + 8px) minmax(0, 1fr);
        gap: 22px; }
.case + .case { border-top: 1px solid var(--line); margin-top: 18px; padding-top: 18px; }
.query img { width: calc(var(--thumb) * 1.6); height: calc(var(--thumb) * 1.6); }
.query .caption { -webkit-line-clamp: 8; }
.rank { font-size: 13px; font-weight: 700; color: #fff; background: var(--ink);
        border-radius: 999px; padding: 1px 9px; display: inline-block; margin-bottom: 6px; }
.strip-title { font-size: 13px; font-weight: 600; color: var(--muted); margin: 0 0 6px;
        text-transform: uppercase; letter-spacing: .03em; }
.strip { display: grid; grid-template-columns: repeat(auto-fill, minmax(calc(var(--thumb) + 14px), 1fr));
         gap: 10px; margin-bottom: 14px; }
.card { font-size: 12.5px; line-height: 1.35; min-width: 0; }
.card img, .query img { display: block; object-fit: cover; border-radius: 6px; background: #d0d4da;
        border: 2px solid transparent; }
.card img { width: var(--thumb); height: var(--thumb); max-width: 100%; }
.card.shared img { border-color: var(--ok); }
.card.only img { border-color: var(--bad); }
.caption { display: -webkit-box; -webkit-box-orient: vertical; -webkit-line-clamp: 4;
           overflow: hidden; overflow-wrap: anywhere; margin: 4px 0 2px; }
.id { font: 11.5px/1.3 ui-monospace, "SFMono-Regular", Menlo, Consolas, "DejaVu Sans Mono", monospace;
      color: var(--muted); overflow-wrap: anywhere; }
.cos { font: 12px/1.4 ui-monospace, "SFMono-Regular", Menlo, Consolas, "DejaVu Sans Mono", monospace; }
.cos .p { color: var(--probe); } .cos .r { color: var(--ref); }
.failure + .failure { border-top: 1px solid #eef1f4; margin-top: 12px; padding-top: 12px; }
.failure .strip { grid-template-columns: repeat(auto-fill, minmax(calc(var(--thumb) * .6 + 8px), 1fr)); }
.failure .card img { width: calc(var(--thumb) * .6); height: calc(var(--thumb) * .6); }
.legend > span { display: inline-block; margin-right: 18px; }
.swatch { display: inline-block; width: 11px; height: 11px; border-radius: 3px;
          vertical-align: -1px; margin-right: 5px; }
"""

# Labels of known summary keys, in the order the run table shows them; others follow.
_LABELS = {
    "images": "Images embedded",
    "embedded": "Images embedded",
    "skipped": "Images skipped",
    "k": "k (neighbours per image)",
    "mean_overlap": "Mean overlap@k",
    "mean_jaccard": "Mean Jaccard",
    "probe": "Probe model",
    "reference": "Reference model",
    "models": "Models",
    "recall": "Recall@k of the approximate index",
    "rank_by": "Ranked by",
    "pairs": "MMVP-style pairs",
    "wall_s": "Wall time (s)",
}


# ---------------------------------------------------------------------------------------
# Shared HTML pieces


def esc(text: object) -> str:
    """HTML-escape any value (quotes included, so it is safe in attributes); None -> ""."""
    return "" if text is None else html.escape(str(text), quote=True)


def placeholder_data_uri(size: int = 128, label: str = "no image") -> str:
    """A grey square SVG as a data URI, shown where an image cannot be read."""
    svg = (
        f'<svg xmlns="http://www.w3.org/2000/svg" width="{int(size)}" height="{int(size)}" '
        'viewBox="0 0 100 100"><rect width="100" height="100" fill="#d0d4da"/>'
        '<text x="50" y="54" font-size="11" text-anchor="middle" fill="#59636e" '
        f'font-family="sans-serif">{esc(label)}</text></svg>'
    )
    return "data:image/svg+xml;base64," + base64.b64encode(svg.encode()).decode("ascii")


def thumbnail_data_uri(src: str | bytes, size: int = 128, quality: int = 85) -> str:
    """A (size, size) centre-cropped JPEG thumbnail of an image as ``data:image/jpeg;base64,...``.

    src: a local path, an object-storage URI or the encoded bytes. The crop is the one the
    encoders see (``clipscan.stages.decode.decode_image``). Never raises: a missing,
    corrupt or oversized image gives ``placeholder_data_uri(size)``.
    """
    try:
        from PIL import Image

        from clipscan.stages.decode import decode_image, read_image_bytes

        data = bytes(src) if isinstance(src, bytes | bytearray | memoryview) else None
        if data is None:
            data = read_image_bytes(str(src))
        pixels, _ = decode_image(data, size, THUMB_MAX_PIXELS)
        buf = io.BytesIO()
        Image.fromarray(pixels, "RGB").save(buf, "JPEG", quality=quality, optimize=True)
        return "data:image/jpeg;base64," + base64.b64encode(buf.getvalue()).decode("ascii")
    except Exception:  # a report shows what it can; the run's skip list has the reason
        return placeholder_data_uri(size)


class Thumbs:
    """Thumbnail data URIs by uri, each image read once per report."""

    def __init__(self, size: int = 128) -> None:
        self.size = size
        self._cache: dict[str, str] = {}

    def __call__(self, uri: str | None) -> str:
        if not uri:
            return placeholder_data_uri(self.size)
        if uri not in self._cache:
            self._cache[uri] = thumbnail_data_uri(uri, self.size)
        return self._cache[uri]


def png_data_uri(src: str | bytes) -> str:
    """``data:image/png;base64,...`` of PNG bytes or of the PNG file at a path or URI."""
    data = bytes(src) if isinstance(src, bytes | bytearray | memoryview) else cfs.read_bytes(src)
    return "data:image/png;base64," + base64.b64encode(data).decode("ascii")


def new_figure(width: float = 6.4, height: float = 4.2) -> Any:
    """A matplotlib ``Figure`` on the Agg backend, outside pyplot's global state."""
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib.figure import Figure

    return Figure(figsize=(width, height), layout="constrained")


def figure_to_png(fig: Any, dpi: int = 110) -> bytes:
    """Render a matplotlib figure to PNG bytes (Agg backend); closes it if pyplot holds it."""
    import sys

    import matplotlib

    matplotlib.use("Agg")
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=dpi, facecolor="white")
    if "matplotlib.pyplot" in sys.modules:
        sys.modules["matplotlib.pyplot"].close(fig)
    return buf.getvalue()


def page(title: str, sections: Sequence[str], css: str = CSS, thumb: int | None = None) -> str:
    """A complete HTML5 document: inline CSS, no external resources, no scripts.

    sections: HTML fragments (already escaped) placed in order under the title; ``thumb``
    sets the thumbnail side in px used by the CSS grid.
    """
    style = f' style="--thumb: {int(thumb)}px"' if thumb else ""
    return (
        "<!DOCTYPE html>\n"
        '<html lang="en">\n<head>\n<meta charset="utf-8">\n'
        '<meta name="viewport" content="width=device-width, initial-scale=1">\n'
        f"<title>{esc(title)}</title>\n<style>{css}</style>\n</head>\n"
        f"<body{style}>\n<main>\n<h1>{esc(title)}</h1>\n"
        + "\n".join(sections)
        + f'\n<p class="note">Generated by clipscan {esc(__version__)}.</p>\n'
        "</main>\n</body>\n</html>\n"
    )


def section(title: str, body: str, anchor: str | None = None) -> str:
    """A titled box; ``body`` is HTML already escaped."""
    ident = f' id="{esc(anchor)}"' if anchor else ""
    return f"<section{ident}>\n<h2>{esc(title)}</h2>\n{body}\n</section>"


def summary_table(values: Mapping[str, Any]) -> str:
    """A two-column table of label -> value; nested mappings become "outer / inner" rows,
    floats 4 significant digits, ints with thousands separators, None "-"."""
    rows = "".join(
        f"<tr><th>{esc(label)}</th><td>{esc(_fmt(value))}</td></tr>"
        for label, value in _flatten(values)
    )
    return f'<table class="summary">{rows}</table>'


def figure_html(data_uri: str, caption: str, alt: str) -> str:
    return (
        f'<figure><img src="{data_uri}" alt="{esc(alt)}">'
        f"<figcaption>{esc(caption)}</figcaption></figure>"
    )


def card(
    thumb_uri: str,
    caption: str | None,
    ident: str | None = None,
    meta: str = "",
    cls: str = "",
) -> str:
    """One image tile: thumbnail, caption (clamped; the full text on hover), id, and
    ``meta``, an HTML fragment the caller has escaped (cosines, ranks)."""
    text = esc(caption)
    return (
        f'<div class="card {esc(cls)}"><img src="{thumb_uri}" alt="{esc(ident)}" '
        f'title="{text}" loading="lazy">'
        f'<div class="caption" title="{text}">{text}</div>'
        + (f'<div class="id">{esc(ident)}</div>' if ident else "")
        + (f'<div class="cos">{meta}</div>' if meta else "")
        + "</div>"
    )


# ---------------------------------------------------------------------------------------
# DAF


def daf_figures(discrepancies: pa.Table, seed: int = 0) -> Figures:
    """The plots' aggregates of a whole discrepancy table (the mine stage sums the same per
    part, ``clipscan.stages.mine.Figures``): overlap counts, the mean, and the cosines of a
    seeded sample of at most ``PLOT_POINTS`` probe neighbours."""
    from clipscan.stages.mine import plot_fraction

    k = _k_of(discrepancies)
    return Figures.of(discrepancies, k, plot_fraction(discrepancies.num_rows, k), seed)


def daf_plots(
    data: pa.Table | Figures, labels: tuple[str, str] = ("probe", "reference")
) -> dict[str, bytes]:
    """PNG bytes of ``overlap_hist.png`` (overlap@k over images) and ``cosines.png`` (probe
    vs reference cosine of every probe neighbour of the sampled images, probe-only ones
    highlighted).

    data: the streaming aggregates (``clipscan.stages.mine.Figures``) or a whole table of
    ``clipscan.stages.discrepancy.mine``. labels: model names for the axes.
    """
    figures = data if isinstance(data, Figures) else daf_figures(data)
    probe_name, ref_name = labels
    n, k = figures.images, figures.k

    fig = new_figure(5.6, 4.6)
    ax = fig.add_subplot()
    counts = np.asarray(figures.overlap_counts)
    ax.bar(np.arange(k + 1) / max(k, 1), counts, width=0.8 / max(k, 1), color="#1f6feb")
    if n:
        mean = figures.mean_overlap
        ax.axvline(mean, color="#cf222e", linestyle="--", linewidth=1.2, label=f"mean {mean:.3f}")
        ax.legend(loc="upper left", frameon=False)
    ax.set_xlabel(f"overlap@{k}: shared top-{k} neighbours / {k}")
    ax.set_ylabel("images")
    ax.set_title(f"Overlap@{k} per image ({n:,} images)")
    ax.set_xlim(-0.6 / max(k, 1), 1 + 0.6 / max(k, 1))
    overlap_png = figure_to_png(fig)

    fig = new_figure(5.6, 4.6)
    ax = fig.add_subplot()
    pts = {c: np.asarray(figures.points.get(c, np.zeros(0)), dtype=np.float64) for c in ("px", "py", "ox", "oy")}
    px, py, ox, oy = pts["px"], pts["py"], pts["ox"], pts["oy"]
    if py.size != px.size:  # a table without the column: only the probe-only points
        px, py = px[:0], py[:0]
    sampled = f" of {figures.sampled_images:,} sampled images" if figures.sampled_images < n else ""
    keep = np.isfinite(px) & np.isfinite(py)
    px, py = px[keep], py[keep]
    both = np.concatenate([px, py, ox, oy])
    lo = float(np.nanmin(both)) if both.size else 0.0
    lo = min(lo - 0.02, 0.9)
    if px.size > 20_000:
        ax.hexbin(px, py, gridsize=70, bins="log", cmap="Blues", extent=(lo, 1, lo, 1), mincnt=1)
        ax.set_title(f"Cosine of each probe neighbour ({px.size:,}{sampled}; log density)")
    else:
        ax.scatter(px, py, s=6, alpha=0.35, color="#8c959f", label="in both top-k", lw=0)
        ax.scatter(ox, oy, s=8, alpha=0.6, color="#cf222e", label="probe-only", lw=0)
        ax.legend(loc="lower right", frameon=False)
        ax.set_title(f"Cosine of each probe neighbour ({px.size:,}{sampled})")
    ax.plot([lo, 1], [lo, 1], color="#1f2328", linewidth=1, linestyle=":")
    ax.set_xlim(lo, 1)
    ax.set_ylim(lo, 1)
    ax.set_aspect("equal")
    ax.set_xlabel(f"{probe_name} cosine")
    ax.set_ylabel(f"{ref_name} cosine")
    cos_png = figure_to_png(fig)
    return {"overlap_hist.png": overlap_png, "cosines.png": cos_png}


def write_daf_report(
    run_dir: str,
    summary: Mapping[str, Any],
    discrepancies: pa.Table,
    cases: pa.Table,
    failures: Failures | None = None,
    rows: int = 50,
    thumb: int = 128,
    corpus: pa.Table | None = None,
    attributes: Mapping[str, Any] | None = None,
    figures: Figures | None = None,
) -> str:
    """Write ``plots/overlap_hist.png``, ``plots/cosines.png`` and ``report.html`` under
    ``run_dir`` (atomically, local or object storage); return the report's path.

    summary: figures of the run (any keys; ``images``, ``skipped``, ``mean_overlap``,
    ``k``, ``models``/``probe``/``reference``, ``recall``, ``wall_s`` get readable labels;
    overlap and k are computed from the aggregates when absent). discrepancies: rows of
    ``mine``'s table holding at least the shown cases (their reference lists): the whole
    table, or only those rows when ``figures`` is given. figures: the plots' streaming
    aggregates (``clipscan.stages.mine.Figures``); None = computed from the whole table
    ``discrepancies``. cases: ``clipscan.stages.discrepancy.cases``'s table, the top ``rows`` shown.
    failures: the summary's ``Failures`` (types {type, description, prompts, cases,
    examples}); None is ``Failures.off()``: the LLM summary was not run.
    corpus: ``id``, ``uri``, ``caption`` of the images, to show the reference neighbours;
    without it only images named in ``cases`` get thumbnails. attributes: the
    ``attributes.json`` mapping, shown first (``attributes_html``); None leaves it out.
    """
    from clipscan.stages.discrepancy import corpus_lookup

    thumbs = Thumbs(thumb)
    top = cases.sort_by("rank").slice(0, max(0, rows)).to_pylist()
    failures = failures or Failures.off()
    failure_list, failure_note = failures.types, "" if failures.types else failures.note()

    case_ids = [c["id"] for c in top]
    refs = _reference_lists(discrepancies, case_ids)
    wanted = set(case_ids)
    for c in top:
        wanted.update(c["neighbour_ids"] or [])
    for r in refs.values():
        wanted.update(r["reference_neighbours"] or [])
    for f in failure_list:
        wanted.update(str(e) for e in (f.get("examples") or [])[:8])
    lookup: dict[str, tuple[str, str]] = {}
    for c in top:  # cases carry their own uris and captions
        lookup[c["id"]] = (c["uri"] or "", c["caption"] or "")
        for j, u, t in zip(
            c["neighbour_ids"], c["neighbour_uris"], c["neighbour_captions"], strict=True
        ):
            lookup[j] = (u or "", t or "")
    if corpus is not None:
        lookup.update(corpus_lookup(corpus, sorted(wanted - set(lookup))))

    labels = _model_labels(summary)
    if figures is None:
        figures = daf_figures(discrepancies)
    plots = daf_plots(figures, labels)
    for name, data in plots.items():
        cfs.write_bytes_atomic(cfs.join(run_dir, "plots", name), data)

    k = figures.k
    values: dict[str, Any] = {}
    if not any("overlap" in key for key in summary) and figures.images:
        values["mean_overlap"] = figures.mean_overlap
    if "k" not in summary:
        values["k"] = k
    values.update(summary)
    known = [key for key in _LABELS if key in values]
    values = {
        _LABELS.get(key, key.replace("_", " ")): values[key]
        for key in known + [key for key in values if key not in _LABELS]
    }

    sections = [section("Run", summary_table(values), "run")]
    if attributes is not None:
        sections.insert(0, section("What the probe fails to see", attributes_html(attributes), "attributes"))
    sections.append(
        section(
            "Failure types", _failures_html(failure_list, failure_note, lookup, thumbs), "failures"
        )
    )
    sections.append(
        section(
            "Distributions",
            '<div class="plots">'
            + figure_html(
                png_data_uri(plots["overlap_hist.png"]),
                f"Shared neighbours in the top {k} of the two models, per image.",
                "overlap histogram",
            )
            + figure_html(
                png_data_uri(plots["cosines.png"]),
                "Every probe neighbour: its cosine to the image under each model. Points far "
                "below the diagonal are images the probe puts close and the reference does not.",
                "probe vs reference cosine",
            )
            + "</div>",
            "plots",
        )
    )
    sections.append(
        section(
            f"Top {len(top)} failure cases",
            _cases_legend(labels, k)
            + "".join(_case_html(c, refs.get(c["id"]), lookup, thumbs) for c in top)
            if top
            else '<p class="muted">No image has a probe-only neighbour.</p>',
            "cases",
        )
    )
    title = f"DAF: {labels[0]} vs {labels[1]}"
    path = cfs.join(run_dir, "report.html")
    cfs.write_bytes_atomic(path, page(title, sections, thumb=thumb).encode("utf-8"))
    return path


def attributes_html(attributes: Mapping[str, Any], control: str | None = None) -> str:
    """The attribute contrast (``attributes.json``) as a table, strongest evidence first:
    per attribute its lift with the 95 % interval, both rates, the support and example ids;
    a lift whose lower bound is above 1 is marked as evidence. A ``planted`` attribute adds
    one sentence saying the run is a planted check of the method and whether it was found."""
    rows = list(attributes.get("attributes") or [])
    control = control or str(attributes.get("control", "control"))
    out = []
    planted = attributes.get("planted")
    if planted:
        found = attributes.get("planted_found")
        out.append(
            f'<p><b>This run is a planted check of the method:</b> the probe was built blind to '
            f'<b>{esc(planted)}</b>, so {esc(planted)} should come first with a lift above 1 '
            f'&mdash; {"and it does" if found else "and it does not"}.</p>'
        )
    if not rows:
        return "".join(out) + '<p class="muted">No probe-only pairs to compare.</p>'
    best = rows[0]
    if best.get("ci") and best["ci"][0] is not None and best["ci"][0] > 1:
        out.append(
            f"<p>Captions of images the probe calls alike and the reference does not differ in "
            f"<b>{esc(best['name'])}</b> {_fmt(best['lift'])} times as often as the control's "
            f"(95 % interval {_fmt(best['ci'][0])} to {_fmt(best['ci'][1])}).</p>"
        )
    else:
        out.append('<p>No attribute differs more often between probe-only neighbours than between '
                   'the control pairs (no lift\'s lower bound is above 1).</p>')
    head = ("<tr><th>attribute</th><th>lift</th><th>95 % interval</th><th>rate</th>"
            f"<th>control rate ({esc(control)})</th><th>pairs</th><th>examples</th></tr>")
    body = []
    for r in rows:
        lo, hi = (r.get("ci") or [None, None])[:2]
        mark = " &#9650;" if lo is not None and lo > 1 else ""
        body.append(
            f"<tr><td><b>{esc(r['name'])}</b>{mark}</td><td>{esc(_fmt(r.get('lift')))}</td>"
            f"<td>{esc(_fmt(lo))} &ndash; {esc(_fmt(hi))}</td><td>{esc(_fmt(r.get('rate')))}</td>"
            f"<td>{esc(_fmt(r.get('control_rate')))}</td><td>{esc(_fmt(r.get('pairs')))}</td>"
            f'<td class="id">{esc(", ".join(str(e) for e in (r.get("examples") or [])[:4]))}</td></tr>'
        )
    out.append(f'<table class="summary">{head}{"".join(body)}</table>')
    out.append(
        '<p class="note">rate: share of the attribute\'s caption words that one caption of a '
        "probe-only pair uses and the other does not; control rate: the same over the control "
        "pairs; lift = rate / control rate. &#9650; marks a lower bound above 1.</p>"
    )
    return "".join(out)


# ---------------------------------------------------------------------------------------
# Internals


def _fmt(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, int | np.integer):
        return f"{int(value):,}"
    if isinstance(value, float | np.floating):
        v = float(value)
        return str(v) if not math.isfinite(v) else f"{v:.4g}"
    if isinstance(value, list | tuple):
        return ", ".join(_fmt(v) for v in value)
    return str(value)


def _flatten(values: Mapping[str, Any], prefix: str = "") -> Iterable[tuple[str, Any]]:
    for key, value in values.items():
        label = f"{prefix}{key}"
        if isinstance(value, Mapping):
            yield from _flatten(value, f"{label} / ")
        else:
            yield label, value


def _flat(table: pa.Table, column: str) -> np.ndarray:
    if column not in table.column_names or table.num_rows == 0:
        return np.zeros(0, dtype=np.float64)
    flat = pc.list_flatten(table.column(column))
    return np.asarray(flat.to_numpy(zero_copy_only=False), dtype=np.float64)


def _k_of(discrepancies: pa.Table) -> int:
    if discrepancies.num_rows == 0:
        return 0
    lengths = pc.list_value_length(discrepancies.column("probe_neighbours"))
    return int(pc.max(lengths).as_py() or 0)


def _model_labels(summary: Mapping[str, Any]) -> tuple[str, str]:
    models = summary.get("models")
    models = models if isinstance(models, Mapping) else {}
    probe = summary.get("probe", models.get("probe", "probe"))
    ref = summary.get("reference", models.get("reference", "reference"))
    return str(probe), str(ref)


def _reference_lists(discrepancies: pa.Table, ids: list[str]) -> dict[str, dict[str, Any]]:
    if not ids:
        return {}
    cols = [
        c
        for c in (
            "id",
            "probe_neighbours",
            "reference_neighbours",
            "reference_cos",
            "reference_neighbours_probe_cos",
        )
        if c in discrepancies.column_names
    ]
    small = discrepancies.select(cols).filter(
        pc.is_in(discrepancies.column("id"), value_set=pa.array(ids, type=pa.string()))
    )
    return {r["id"]: r for r in small.to_pylist()}


def _failures_html(
    failures: Sequence[Mapping[str, Any]],
    note: str,
    lookup: Mapping[str, tuple[str, str]],
    thumbs: Thumbs,
) -> str:
    if not failures:
        return f'<p class="muted">{esc(note or "The LLM summary found no failure types.")}</p>'
    parts = []
    for f in failures:
        heading = f.get("type") or f.get("heading") or "(untitled)"
        counts = []
        for key in ("cases", "prompts"):
            value = f.get(key)
            if value is not None:
                count = len(value) if isinstance(value, list | tuple) else value
                counts.append(f"{_fmt(count)} {key}")
        examples = [str(e) for e in (f.get("examples") or [])[:8]]
        tiles = "".join(
            card(thumbs(lookup.get(e, ("", ""))[0]), lookup.get(e, ("", ""))[1], e)
            for e in examples
        )
        judged = _judge_note(f.get("judge"))
        parts.append(
            '<div class="failure">'
            f"<h3>{esc(heading)}{judged[0]}</h3>" + judged[1] +
            f"<p>{esc(f.get('description'))}</p>"
            + (f'<p class="note">{esc(" · ".join(counts))}</p>' if counts else "")
            + (f'<div class="strip">{tiles}</div>' if tiles else "")
            + "</div>"
        )
    return "".join(parts)


def _judge_note(judge: Mapping[str, Any] | None) -> tuple[str, str]:
    """(a mark after the heading, a line of figures) for a failure type's judge entry."""
    if not judge:
        return "", ""
    lo, hi = (judge.get("ci") or [None, None])[:2]
    mark = (' <span style="color: var(--ok)">confirmed</span>' if judge.get("confirmed")
            else ' <span class="muted">unconfirmed</span>')
    line = (f'<p class="note">judge: holds for {_fmt(judge.get("rate"))} of {_fmt(judge.get("judged"))} held-out '
            f'cases, {_fmt(judge.get("control_rate"))} of {_fmt(judge.get("control_judged"))} controls; lift '
            f'{_fmt(judge.get("lift"))} (95 % {_fmt(lo)} to {_fmt(hi)})</p>')
    return mark, line


def _cases_legend(labels: tuple[str, str], k: int) -> str:
    return (
        '<p class="note legend">'
        '<span><span class="swatch" style="background:#cf222e"></span>'
        f"probe-only: in the {esc(labels[0])} top {k}, not in the {esc(labels[1])} top {k}</span>"
        '<span><span class="swatch" style="background:#1a7f37"></span>'
        f"in both top-{k} lists</span>"
        f'<span><span class="cos"><span class="p">p</span></span> {esc(labels[0])} cosine, '
        f'<span class="cos"><span class="r">r</span></span> {esc(labels[1])} cosine, '
        f"#n rank under {esc(labels[1])}</span></p>"
    )


def _case_html(
    case: Mapping[str, Any],
    ref: Mapping[str, Any] | None,
    lookup: Mapping[str, tuple[str, str]],
    thumbs: Thumbs,
) -> str:
    def cos(value: float | None, cls: str, name: str) -> str:
        text = "-" if value is None else f"{value:.3f}"
        return f'<span class="{cls}">{name} {text}</span>'

    only = []
    ranks = case.get("neighbour_reference_rank") or [None] * len(case["neighbour_ids"])
    for j, u, t, p, r, rk in zip(
        case["neighbour_ids"],
        case["neighbour_uris"],
        case["neighbour_captions"],
        case["neighbour_probe_cos"],
        case["neighbour_reference_cos"],
        ranks,
        strict=True,
    ):
        where = f"#{rk}" if rk is not None else "&gt; depth"
        meta = f"{cos(p, 'p', 'p')} {cos(r, 'r', 'r')}<br>ref. rank {where}"
        only.append(card(thumbs(u), t, j, meta, "only"))
    refs = []
    if ref:
        probe_set = set(ref.get("probe_neighbours") or [])
        names = ref["reference_neighbours"]
        probe_cos = ref.get("reference_neighbours_probe_cos") or [None] * len(names)
        for j, r, p in zip(names, ref["reference_cos"], probe_cos, strict=True):
            u, t = lookup.get(j, ("", ""))
            cls = "shared" if j in probe_set else ""
            refs.append(card(thumbs(u), t, j, f"{cos(p, 'p', 'p')} {cos(r, 'r', 'r')}", cls))
    overlap, gap = case.get("overlap"), case.get("gap")
    stats = []
    if overlap is not None:
        stats.append(f"overlap {overlap:.2f}")
    if gap is not None:
        stats.append(f"gap {gap:.3f}")
    return (
        '<div class="case"><div class="query">'
        f'<div class="rank">#{esc(case["rank"])}</div>'
        f'<img src="{thumbs(case["uri"])}" alt="{esc(case["id"])}" title="{esc(case["caption"])}">'
        f'<div class="caption">{esc(case["caption"])}</div>'
        f'<div class="id">{esc(case["id"])}</div>'
        f'<div class="cos">{esc(" · ".join(stats))}</div>'
        "</div><div>"
        f'<div class="strip-title">Probe-only neighbours ({len(only)})</div>'
        f'<div class="strip">{"".join(only)}</div>'
        + (
            f'<div class="strip-title">Reference top {len(refs)}</div>'
            f'<div class="strip">{"".join(refs)}</div>'
            if refs
            else ""
        )
        + "</div></div>"
    )
