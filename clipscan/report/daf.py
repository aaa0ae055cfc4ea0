"""DAF's page: the attribute contrast first, the run, the failure types, the plots and the top cases."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from clipscan import fs as cfs
from clipscan.report.kit import (
    Thumbs,
    card,
    esc,
    figure_html,
    figure_to_png,
    fmt,
    new_figure,
    page,
    png_data_uri,
    section,
    summary_table,
)
from clipscan.stages.mine import Figures
from clipscan.stages.summarise.result import Failures

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


def daf_plots(
    data: pa.Table | Figures, labels: tuple[str, str] = ("probe", "reference")
) -> dict[str, bytes]:
    """PNG bytes of ``overlap_hist.png`` (overlap@k over images) and ``cosines.png`` (probe
    vs reference cosine of every probe neighbour of the sampled images, probe-only ones
    highlighted).

    data: the streaming aggregates (``clipscan.stages.mine.Figures``) or a whole table of
    ``clipscan.stages.discrepancy.mine``. labels: model names for the axes.
    """
    figures = data if isinstance(data, Figures) else Figures.of_table(data)
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
        figures = Figures.of_table(discrepancies)
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
            f"<b>{esc(best['name'])}</b> {fmt(best['lift'])} times as often as the control's "
            f"(95 % interval {fmt(best['ci'][0])} to {fmt(best['ci'][1])}).</p>"
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
            f"<tr><td><b>{esc(r['name'])}</b>{mark}</td><td>{esc(fmt(r.get('lift')))}</td>"
            f"<td>{esc(fmt(lo))} &ndash; {esc(fmt(hi))}</td><td>{esc(fmt(r.get('rate')))}</td>"
            f"<td>{esc(fmt(r.get('control_rate')))}</td><td>{esc(fmt(r.get('pairs')))}</td>"
            f'<td class="id">{esc(", ".join(str(e) for e in (r.get("examples") or [])[:4]))}</td></tr>'
        )
    out.append(f'<table class="summary">{head}{"".join(body)}</table>')
    out.append(
        '<p class="note">rate: share of the attribute\'s caption words that one caption of a '
        "probe-only pair uses and the other does not; control rate: the same over the control "
        "pairs; lift = rate / control rate. &#9650; marks a lower bound above 1.</p>"
    )
    return "".join(out)


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
                counts.append(f"{fmt(count)} {key}")
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
    line = (f'<p class="note">judge: holds for {fmt(judge.get("rate"))} of {fmt(judge.get("judged"))} held-out '
            f'cases, {fmt(judge.get("control_rate"))} of {fmt(judge.get("control_judged"))} controls; lift '
            f'{fmt(judge.get("lift"))} (95 % {fmt(lo)} to {fmt(hi)})</p>')
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
