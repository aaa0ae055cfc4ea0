"""The report kit every job's page is built from: HTML escaping, thumbnails, plots, tables and the page itself.

Pages are self-contained (inline CSS, data-URI images): they need no network and no
JavaScript. Captions and ids come from user data and are escaped everywhere (``esc``).
"""

from __future__ import annotations

import base64
import html
import io
import math
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import numpy as np

from clipscan import __version__
from clipscan import fs as cfs

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
        f"<tr><th>{esc(label)}</th><td>{esc(fmt(value))}</td></tr>"
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


def fmt(value: Any) -> str:
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
        return ", ".join(fmt(v) for v in value)
    return str(value)


def _flatten(values: Mapping[str, Any], prefix: str = "") -> Iterable[tuple[str, Any]]:
    for key, value in values.items():
        label = f"{prefix}{key}"
        if isinstance(value, Mapping):
            yield from _flatten(value, f"{label} / ")
        else:
            yield label, value
