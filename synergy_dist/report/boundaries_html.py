"""A text with the router's concept boundaries marked: an HTML page and the same as a PNG.

One colour band per concept (colours cycle so neighbours differ); hovering a concept shows the
boundary probability of its first byte (the title attribute) and its byte range. A multi-byte UTF-8
character split by a boundary is shown in the concept where its last byte is.
"""

from __future__ import annotations

import codecs
import html
from dataclasses import dataclass
from pathlib import Path

from synergy_dist.evaluate import RoutedText
from synergy_dist.report import require_matplotlib

COLOURS = ["#ffd8a8", "#b2f2bb", "#a5d8ff", "#eebefa", "#ffec99", "#c3fae8"]


@dataclass
class Concept:
    start: int  # first byte
    end: int  # one past the last byte
    prob: float  # boundary probability of the first byte
    text: str  # what the concept shows (see the module docstring for split characters)


def concepts(routed: RoutedText) -> list[Concept]:
    starts = [i for i, b in enumerate(routed.boundary) if b]
    if routed.data and (not starts or starts[0] != 0):
        starts = [0] + starts  # cannot happen for a document start (forced), kept for safety
    decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
    found = []
    for k, start in enumerate(starts):
        end = starts[k + 1] if k + 1 < len(starts) else len(routed.data)
        final = k + 1 == len(starts)
        found.append(Concept(start, end, routed.prob[start], decoder.decode(routed.data[start:end], final=final)))
    return found


def render_html(routed: RoutedText, title: str = "concept boundaries") -> str:
    parts = []
    for k, c in enumerate(concepts(routed)):
        parts.append(f'<span class="concept" style="background:{COLOURS[k % len(COLOURS)]}" '
                     f'title="p={c.prob:.3f} bytes {c.start}-{c.end - 1}" data-p="{c.prob:.6f}">'
                     f"{html.escape(c.text)}</span>")
    n = len(parts)
    mean = len(routed.data) / max(n, 1)
    return (f"<!DOCTYPE html>\n<html><head><meta charset=\"utf-8\"><title>{html.escape(title)}</title>\n"
            "<style>body{font-family:sans-serif;margin:2em} pre{font-family:monospace;white-space:pre-wrap;"
            "line-height:1.6;font-size:14px} .concept{border-right:1px solid #868e96}</style></head>\n<body>\n"
            f"<h1>{html.escape(title)}</h1>\n<p>{len(routed.data)} bytes, {n} concepts, {mean:.2f} bytes per concept. "
            "Each colour band is one concept; hover to see the boundary probability of its first byte.</p>\n"
            f"<pre>{''.join(parts)}</pre>\n</body></html>\n")


def render_png(routed: RoutedText, path: Path, columns: int = 80, max_rows: int = 60) -> int:
    """The same marking as a PNG grid of characters (one cell per character); returns the concepts drawn."""
    plt = require_matplotlib()
    from matplotlib.patches import Rectangle  # optional dependency, present once require_matplotlib passed

    cells = []  # (row, col, char, concept index)
    row = col = 0
    for k, c in enumerate(concepts(routed)):
        for ch in c.text:
            if ch == "\n":
                row, col = row + 1, 0
                continue
            if col >= columns:
                row, col = row + 1, 0
            shown = ch if ch.isprintable() and ord(ch) <= 0xFFFF else "?"  # the mono font has no emoji glyphs
            cells.append((row, col, shown, k))
            col += 1
    cells = [cell for cell in cells if cell[0] < max_rows]
    rows = (max(c[0] for c in cells) + 1) if cells else 1
    fig = plt.figure(figsize=(columns * 0.11 + 0.4, rows * 0.22 + 0.4))
    ax = fig.add_axes((0, 0, 1, 1))
    ax.set_xlim(-0.5, columns + 0.5)
    ax.set_ylim(rows + 0.5, -0.5)
    ax.set_axis_off()
    for r, c, ch, k in cells:
        ax.add_patch(Rectangle((c, r), 1, 1, facecolor=COLOURS[k % len(COLOURS)], edgecolor="none"))
        ax.text(c + 0.5, r + 0.55, ch, ha="center", va="center", family="monospace", fontsize=8)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return len({k for *_, k in cells})
