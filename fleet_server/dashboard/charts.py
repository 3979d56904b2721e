"""Inline SVG charts, rendered on the server: no JavaScript chart library, no CDN.

Every function returns an SVG string (``markupsafe.Markup``) sized by a ``viewBox`` so it
scales with the page; labels are escaped. Colours come from CSS classes (``ref``, ``cur``,
``line-a``…) defined in ``static/dashboard.css``.
"""

from __future__ import annotations

from collections.abc import Sequence

from markupsafe import Markup, escape


def _fmt(x: float) -> str:
    if x == 0:
        return "0"
    if abs(x) >= 1000 or abs(x) < 0.01:
        return f"{x:.2g}"
    return f"{x:.3g}"


def paired_bars(
    labels: Sequence[str],
    reference: Sequence[float],
    current: Sequence[float],
    *,
    width: int = 360,
    height: int = 150,
    title: str = "",
) -> Markup:
    """Reference vs current share per bin/item, side by side (current may be empty)."""
    n = max(len(labels), 1)
    top = max([*reference, *current, 1e-9])
    pad_l, pad_b, pad_t = 30, 22, 8
    plot_w, plot_h = width - pad_l - 4, height - pad_b - pad_t
    slot = plot_w / n
    bw = max(slot / 2 - 1, 1)
    parts = [
        f'<svg class="chart bars" viewBox="0 0 {width} {height}" role="img" '
        f'aria-label="{escape(title or "reference vs current distribution")}">',
        f"<title>{escape(title)}</title>" if title else "",
        f'<text class="axis" x="2" y="{pad_t + 8}">{_fmt(top * 100)}%</text>',
        f'<line class="axis" x1="{pad_l}" y1="{pad_t + plot_h}" x2="{width - 4}" '
        f'y2="{pad_t + plot_h}"/>',
    ]
    for i in range(len(labels)):
        x = pad_l + i * slot
        for j, series, cls in ((0, reference, "ref"), (1, current, "cur")):
            if i < len(series):
                h = plot_h * series[i] / top
                parts.append(
                    f'<rect class="{cls}" x="{x + j * bw + 0.5:.1f}" y="{pad_t + plot_h - h:.1f}" '
                    f'width="{bw:.1f}" height="{h:.1f}"><title>{escape(labels[i])}: '
                    f"{series[i] * 100:.1f}%</title></rect>"
                )
    step = max(1, len(labels) // 5)
    for i in range(0, len(labels), step):
        x = pad_l + i * slot + slot / 2
        parts.append(
            f'<text class="axis" x="{x:.1f}" y="{height - 6}" text-anchor="middle">'
            f"{escape(labels[i][:10])}</text>"
        )
    parts.append("</svg>")
    return Markup("".join(parts))


def lines(
    series: dict[str, Sequence[float | None]],
    *,
    width: int = 360,
    height: int = 120,
    threshold: float | None = None,
    title: str = "",
) -> Markup:
    """One polyline per named series over equally spaced points (oldest left)."""
    values = [v for s in series.values() for v in s if v is not None]
    top = max([*values, threshold or 0.0, 1e-9]) * 1.1
    pad_l, pad_b, pad_t = 30, 14, 6
    plot_w, plot_h = width - pad_l - 4, height - pad_b - pad_t
    n = max((len(s) for s in series.values()), default=0)
    parts = [
        f'<svg class="chart lines" viewBox="0 0 {width} {height}" role="img" '
        f'aria-label="{escape(title or ", ".join(series))}">',
        f'<text class="axis" x="2" y="{pad_t + 8}">{_fmt(top)}</text>',
        f'<text class="axis" x="2" y="{pad_t + plot_h}">0</text>',
        f'<line class="axis" x1="{pad_l}" y1="{pad_t + plot_h}" x2="{width - 4}" '
        f'y2="{pad_t + plot_h}"/>',
    ]

    def xy(i: int, v: float) -> tuple[float, float]:
        x = pad_l + (plot_w * i / (n - 1) if n > 1 else plot_w / 2)
        return x, pad_t + plot_h - plot_h * v / top

    if threshold is not None:
        y = xy(0, threshold)[1]
        parts.append(
            f'<line class="threshold" x1="{pad_l}" y1="{y:.1f}" x2="{width - 4}" y2="{y:.1f}">'
            f"<title>threshold {_fmt(threshold)}</title></line>"
        )
    for k, (name, s) in enumerate(series.items()):
        pts = [xy(i, v) for i, v in enumerate(s) if v is not None]
        cls = f"line-{'abcd'[k % 4]}"
        if len(pts) > 1:
            path = " ".join(f"{x:.1f},{y:.1f}" for x, y in pts)
            parts.append(
                f'<polyline class="{cls}" points="{path}"><title>{escape(name)}</title></polyline>'
            )
        for x, y in pts[-1:]:
            parts.append(f'<circle class="{cls}" cx="{x:.1f}" cy="{y:.1f}" r="2.5"/>')
    parts.append("</svg>")
    return Markup("".join(parts))


def progress(parts: dict[str, int], total: int, *, width: int = 240, height: int = 12) -> Markup:
    """A stacked horizontal bar: installed / in progress / failed / rolled back / queued."""
    total = max(total, 1)
    x = 0.0
    out = [
        f'<svg class="chart progress" viewBox="0 0 {width} {height}" preserveAspectRatio="none">'
    ]
    out.append(f'<rect class="track" x="0" y="0" width="{width}" height="{height}" rx="3"/>')
    for cls, n in parts.items():
        if n <= 0:
            continue
        w = width * n / total
        out.append(
            f'<rect class="{escape(cls)}" x="{x:.1f}" y="0" width="{w:.1f}" height="{height}">'
            f"<title>{escape(cls)}: {n}</title></rect>"
        )
        x += w
    out.append("</svg>")
    return Markup("".join(out))
