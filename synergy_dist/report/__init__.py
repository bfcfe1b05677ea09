"""Run reports: training-curve plots (plots.py) and router concept boundaries (boundaries_html.py).

matplotlib is an optional dependency (`pip install synergy-dist[viz]`); the HTML page needs none.
"""

from __future__ import annotations

from pathlib import Path


class ReportError(RuntimeError):
    """A report that cannot be made: missing matplotlib, an empty run directory, no text."""


def require_matplotlib():
    """pyplot on the non-interactive Agg backend, or a ReportError naming the extra to install."""
    try:
        import matplotlib  # optional dependency (the viz extra)
    except ImportError:
        raise ReportError("synergy-report needs matplotlib for its PNG plots: pip install synergy-dist[viz]") from None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # optional dependency, after choosing the Agg backend

    return plt


def save_png(fig, path) -> None:
    """Write a matplotlib figure as a PNG (creating its directory) and free it."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    require_matplotlib().close(fig)
