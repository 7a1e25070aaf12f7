"""Matplotlib without a display: every report figure is drawn on the Agg backend and returned as PNG bytes
(written atomically by the caller)."""

from __future__ import annotations

__all__ = ["pyplot", "figure_png"]


def pyplot():
    """``matplotlib.pyplot`` on the Agg backend (no display needed; imported lazily: matplotlib is optional)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def figure_png(fig, dpi: int = 110) -> bytes:
    """Lays out ``fig``, renders it to PNG bytes and closes it (figures are not garbage-collected while open)."""
    import io

    import matplotlib.pyplot as plt

    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=dpi)
    plt.close(fig)
    return buf.getvalue()
