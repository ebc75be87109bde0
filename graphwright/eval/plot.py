"""One PNG for a swept setting: how a metric moves as a recipe argument changes.

``graphwright eval --sweep`` produces rows like ``{"value": 0.5, "delta": 0.8, ...}``; a line
per group says more than the table when the curve bends. Uses matplotlib's Agg backend so
it works on headless machines.
"""

from __future__ import annotations

from pathlib import Path


def plot_sweep(rows, x: str, y: str, group: str | None = None, path="sweep.png", title: str | None = None) -> Path:
    """Plot ``y`` against ``x`` for the dict ``rows`` (one line per value of ``group``) to ``path``.

    Rows missing ``x`` or ``y`` are skipped; points are sorted by ``x``. Returns the PNG path.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    series: dict = {}
    for r in rows:
        if r.get(x) is None or r.get(y) is None:
            continue
        series.setdefault(r.get(group) if group else None, []).append((r[x], r[y]))
    if not series:
        raise ValueError(f"no rows have both {x!r} and {y!r} to plot")
    fig, ax = plt.subplots(figsize=(6, 4), dpi=120)
    for name, pts in series.items():
        pts.sort(key=lambda p: p[0])
        ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=None if name is None else str(name))
    ax.set_xlabel(x)
    ax.set_ylabel(y)
    if title:
        import textwrap

        ax.set_title("\n".join(textwrap.wrap(title, 60)), fontsize=9)
    if group:
        ax.legend(title=group)
    ax.grid(True, alpha=0.3)
    return save_figure(fig, path)


def save_figure(fig, path) -> Path:
    """Lay out, write ``fig`` to ``path`` (creating its folder) and close it; returns the path."""
    import matplotlib.pyplot as plt

    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)
    return path
