"""The loss plot of a run (``loss.png``); optional: without matplotlib it is skipped.

Read at a glance: the training loss (raw and smoothed) with the validation loss on the same
axis (the same units), and below it the validation metric on an honest scale (accuracy from
0 to 1, perplexity on a log scale), drawn only when there are at least two evaluations; a
single evaluation is written into the title instead of a lone point on an axis of its own.
"""

from __future__ import annotations

import importlib.util
import os
import sys
from pathlib import Path
from typing import Any

from lora_ext.config import Task


def _smooth(values: list[float]) -> tuple[list[float], int]:
    window = max(1, len(values) // 20)
    out = []
    for i in range(len(values)):
        part = values[max(0, i - window + 1) : i + 1]
        out.append(sum(part) / len(part))
    return out, window


def plot_loss(
    history: list[dict[str, Any]], evals: list[dict[str, Any]], task: Task | str, path: Path
) -> bool:
    """Write the plot to ``path`` atomically.

    Args:
        history: per step {"step", "loss", ...}. evals: {"step", "val_loss", "accuracy" |
            "perplexity"}. task: Task.SEQ_CLS (accuracy) or Task.CAUSAL_LM (perplexity).

    Returns:
        False (after one line on stderr) when matplotlib is not installed, else True.
    """
    if importlib.util.find_spec("matplotlib") is None:
        print(
            'loss plot skipped: matplotlib is not installed (pip install "lora_ext[train]")',
            file=sys.stderr,
        )
        return False
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    key = "accuracy" if Task(task) == Task.SEQ_CLS else "perplexity"
    metric_panel = len(evals) >= 2
    fig, axes = plt.subplots(
        2 if metric_panel else 1,
        1,
        figsize=(7, 6 if metric_panel else 4),
        dpi=100,
        sharex=True,
        squeeze=False,
    )
    ax = axes[0][0]
    steps = [h["step"] for h in history]
    losses = [h["loss"] for h in history]
    smooth, window = _smooth(losses)
    ax.plot(steps, losses, color="tab:blue", alpha=0.3, linewidth=0.8, label="train loss")
    ax.plot(
        steps, smooth, color="tab:blue", linewidth=1.5, label=f"train loss ({window}-step mean)"
    )
    if evals:
        ax.plot(
            [e["step"] for e in evals],
            [e["val_loss"] for e in evals],
            "o-",
            color="tab:orange",
            label="validation loss",
        )
    ax.set_ylabel("loss")
    ax.set_ylim(bottom=0)
    ax.legend(loc="upper right")
    ax.grid(alpha=0.3)
    if evals:
        last = evals[-1]
        ax.set_title(f"final validation {key} {last[key]:.4g} at step {last['step']}")
    if metric_panel:
        ax_m = axes[1][0]
        ax_m.plot([e["step"] for e in evals], [e[key] for e in evals], "o-", color="tab:orange")
        ax_m.set_ylabel(f"validation {key}")
        if key == "accuracy":
            ax_m.set_ylim(0, 1)
        else:
            ax_m.set_yscale("log")
        ax_m.grid(alpha=0.3)
    bottom = axes[-1][0]
    bottom.set_xlabel("optimizer step")
    bottom.xaxis.set_major_locator(MaxNLocator(integer=True))
    fig.tight_layout()
    tmp = path.with_name(f".{path.name}.tmp.png")
    fig.savefig(tmp)
    plt.close(fig)
    os.replace(tmp, path)
    return True
