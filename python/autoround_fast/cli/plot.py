"""The per-block plot saved beside the checkpoint (autoround_blocks.svg): the loss at the start
and the best loss of every block on a log scale, and the seconds each block took. Plain SVG,
written by hand: no plotting library to install."""

from __future__ import annotations

import math
from xml.sax.saxutils import escape

WIDTH, PANEL, MARGIN, GAP = 760, 200, 60, 50
HEIGHT = 2 * PANEL + GAP + 2 * MARGIN
SERIES = (("init_loss", "loss at start", "#999999"), ("best_loss", "best loss", "#1f77b4"))


def _x(i: int, n: int) -> float:
    """The centre of block i's slot."""
    return MARGIN + (i + 0.5) * (WIDTH - 2 * MARGIN) / max(n, 1)


def _text(x, y, s, anchor="start", size=12) -> str:
    return f'<text x="{x:.1f}" y="{y:.1f}" font-size="{size}" text-anchor="{anchor}">{escape(s)}</text>'


def _loss_panel(rows: list[dict]) -> list[str]:
    n = len(rows)
    logs = [math.log10(r[k]) for r in rows for k, _, _ in SERIES if r[k] > 0 and math.isfinite(r[k])]
    if not logs:
        return [_text(MARGIN, MARGIN + PANEL / 2, "no losses (iters=0 or the stock backend)")]
    lo, hi = min(logs), max(logs)
    span = hi - lo or 1.0
    top = MARGIN
    y = lambda v: top + PANEL - (math.log10(v) - lo) / span * PANEL  # noqa: E731
    out = [_text(MARGIN, top - 12, "loss per block (log scale)", size=14),
           _text(MARGIN - 6, top + 4, f"{10 ** hi:.3g}", "end"), _text(MARGIN - 6, top + PANEL, f"{10 ** lo:.3g}", "end")]
    for key, label, colour in SERIES:
        pts = [(_x(i, n), y(r[key])) for i, r in enumerate(rows) if r[key] > 0 and math.isfinite(r[key])]
        if len(pts) > 1:
            out.append(f'<polyline fill="none" stroke="{colour}" stroke-width="1.5" points="'
                       + " ".join(f"{a:.2f},{b:.2f}" for a, b in pts) + '"/>')
        out += [f'<circle class="{key}" cx="{a:.2f}" cy="{b:.2f}" r="3" fill="{colour}"/>' for a, b in pts]
    for j, (_, label, colour) in enumerate(SERIES):
        out.append(f'<rect x="{WIDTH - MARGIN - 150}" y="{top - 24 + 16 * j}" width="10" height="10" fill="{colour}"/>')
        out.append(_text(WIDTH - MARGIN - 135, top - 15 + 16 * j, label))
    return out


def _seconds_panel(rows: list[dict]) -> list[str]:
    n = len(rows)
    top = MARGIN + PANEL + GAP
    most = max((r["seconds"] for r in rows), default=0.0) or 1.0
    width = 0.7 * (WIDTH - 2 * MARGIN) / max(n, 1)
    out = [_text(MARGIN, top - 12, f"seconds per block (total {sum(r['seconds'] for r in rows):.1f} s)", size=14),
           _text(MARGIN - 6, top + 4, f"{most:.3g}", "end"), _text(MARGIN - 6, top + PANEL, "0", "end")]
    for i, r in enumerate(rows):
        h = r["seconds"] / most * PANEL
        out.append(f'<rect class="seconds" x="{_x(i, n) - width / 2:.2f}" y="{top + PANEL - h:.3f}" '
                   f'width="{width:.2f}" height="{h:.3f}" fill="#ff7f0e"><title>{escape(r["block"])}</title></rect>')
    out.append(_text(WIDTH / 2, top + PANEL + 30, f"block (0 to {n - 1})", "middle"))
    return out


def blocks_svg(rows: list[dict], title: str) -> str:
    """The plot of the modifier's per-block rows (block, init_loss, best_loss, seconds)."""
    body = [_text(WIDTH / 2, 22, title, "middle", 15), *_loss_panel(rows), *_seconds_panel(rows)]
    return (f'<svg xmlns="http://www.w3.org/2000/svg" width="{WIDTH}" height="{HEIGHT}" '
            f'font-family="sans-serif">\n<rect width="100%" height="100%" fill="white"/>\n'
            + "\n".join(body) + "\n</svg>\n")
