"""Run reports: training-curve plots (plots.py) and router concept boundaries (boundaries_html.py).

matplotlib is an optional dependency (`pip install synergy-dist[viz]`); the HTML page needs none.
"""

from __future__ import annotations


class ReportError(RuntimeError):
    """A report that cannot be made: missing matplotlib, an empty run directory, no text."""


def require_matplotlib():
    """pyplot on the non-interactive Agg backend, or a ReportError naming the extra to install."""
    try:
        import matplotlib
    except ImportError:
        raise ReportError("synergy-report needs matplotlib for its PNG plots: pip install synergy-dist[viz]") from None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt
