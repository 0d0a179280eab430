"""The PNGs of the trainers: the loss and evaluation curves against the step, and fine-tuning's WiSE-FT
sweep (accuracy against robustness per mixing coefficient)."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any, Sequence

if TYPE_CHECKING:
    from .wise_ft import WiseFTPoint

__all__ = ["plot_curves", "plot_wise_ft_sweep", "smooth"]


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")  # files only: no display on training machines
    import matplotlib.pyplot as plt

    return plt


def _save(fig, path: str | Path) -> Path:
    path = Path(path)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    _pyplot().close(fig)
    return path


def smooth(values: list[float], weight: float = 0.9) -> list[float]:
    """An exponential moving average with bias correction (TensorBoard's smoothing)."""
    out, avg = [], 0.0
    for i, v in enumerate(values, start=1):
        avg = weight * avg + (1 - weight) * v
        out.append(avg / (1 - weight**i))
    return out


def plot_curves(rows: list[dict[str, Any]], path: str | Path, title: str = "") -> Path:
    """Writes the loss curve (raw and smoothed) and every ``eval/*`` metric of `rows` to `path`."""
    plt = _pyplot()
    train = [r for r in rows if "loss" in r]
    evals = [r for r in rows if any(k.startswith("eval/") for k in r)]
    fig, axes = plt.subplots(1, 2 if evals else 1, figsize=(11 if evals else 6, 4), squeeze=False)
    ax = axes[0, 0]
    steps, losses = [r["step"] for r in train], [r["loss"] for r in train]
    ax.plot(steps, losses, color="tab:blue", alpha=0.3, linewidth=1, label="loss")
    ax.plot(steps, smooth(losses), color="tab:blue", linewidth=2, label="smoothed")
    ax.set(xlabel="step", ylabel="training loss", title="training loss")
    ax.legend()
    if evals:
        ax = axes[0, 1]
        keys = sorted({k for r in evals for k in r if k.startswith("eval/")})
        for key in keys:
            pts = [(r["step"], r[key]) for r in evals if key in r]
            ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=key[len("eval/") :])
        ax.set(xlabel="step", ylabel="score", title="evaluation", ylim=(0, 1.02))
        ax.legend(fontsize=7)
    if title:
        fig.suptitle(title)
    return _save(fig, path)


def plot_wise_ft_sweep(points: Sequence["WiseFTPoint"], path: str | Path) -> Path:
    """Accuracy on the held-out split (x) against accuracy on its shifted copy (y), one labelled point
    per WiSE-FT coefficient; written to `path`."""
    fig, ax = _pyplot().subplots(figsize=(5, 4))
    ax.plot([p.accuracy for p in points], [p.robustness for p in points], "o-")
    for p in points:
        ax.annotate(f"{p.alpha:g}", (p.accuracy, p.robustness), textcoords="offset points", xytext=(4, 4))
    ax.set_xlabel("top-1, held-out split")
    ax.set_ylabel("top-1, shifted copy")
    ax.set_title("WiSE-FT sweep (label: coefficient)")
    return _save(fig, path)
