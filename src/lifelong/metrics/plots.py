"""Figures of a stream's results (matplotlib, no display needed)."""

from __future__ import annotations

import torch
from matplotlib.figure import Figure  # not pyplot: figures need no backend or screen, and nothing keeps them


def accuracy_heatmap(accuracy: torch.Tensor, title: str = "") -> Figure:
    """Rows: after training task i; columns: test accuracy on task j (annotated in percent)."""
    r = accuracy.detach().cpu().double()
    rows, cols = r.shape
    fig = Figure(figsize=(max(3.6, 1.2 + 0.6 * cols), max(3.0, 0.9 + 0.5 * rows)), dpi=110)
    ax = fig.subplots()
    im = ax.imshow(r.numpy(), vmin=0.0, vmax=1.0, cmap="viridis")
    if rows * cols <= 400:
        for i in range(rows):
            for j in range(cols):
                v = r[i, j].item()
                ax.text(
                    j,
                    i,
                    f"{100 * v:.0f}",
                    ha="center",
                    va="center",
                    fontsize=7,
                    color="white" if v < 0.6 else "black",
                )
    ax.set_xlabel("evaluated on task")
    ax.set_ylabel("after training task")
    ax.set_xticks(range(cols), [str(j + 1) for j in range(cols)])
    ax.set_yticks(range(rows), [str(i + 1) for i in range(rows)])
    ax.set_title(title, fontsize=9)
    fig.colorbar(im, ax=ax, fraction=0.046, pad=0.04, label="accuracy")
    fig.tight_layout()
    return fig


def accuracy_curves(accuracy: torch.Tensor, title: str = "") -> Figure:
    """One line per task: its accuracy after each training task, from the task on (forgetting at a glance)."""
    r = accuracy.detach().cpu().double()
    rows, cols = r.shape
    fig = Figure(figsize=(6, 4), dpi=110)
    ax = fig.subplots()
    x = torch.arange(1, rows + 1)
    for j in range(cols):
        seen = x[j:]
        if len(seen):
            ax.plot(seen.numpy(), r[j:, j].numpy(), marker="o", markersize=3, label=f"task {j + 1}")
    ax.set_xlabel("tasks trained")
    ax.set_ylabel("test accuracy")
    ax.set_ylim(0, 1.02)
    ax.set_xticks(x.numpy())
    ax.grid(alpha=0.3)
    if cols <= 20:
        ax.legend(fontsize=7, ncol=2 if cols > 10 else 1, loc="lower left")
    ax.set_title(title, fontsize=9)
    fig.tight_layout()
    return fig
