"""The loss curve of a run."""

from __future__ import annotations

import math
import os
from typing import Dict, List, Mapping, Sequence


def loss_history(log_history: Sequence[Mapping]) -> Dict[str, List[tuple]]:
    """Trainer's ``state.log_history`` -> {"train": [(step, loss)], "validation": [(step, eval_loss)]}."""
    train_ = [(entry["step"], entry["loss"]) for entry in log_history if "loss" in entry and "step" in entry]
    validation = [(entry["step"], entry["eval_loss"]) for entry in log_history if "eval_loss" in entry and "step" in entry]
    return {"train": train_, "validation": validation}


def save_loss_curve(log_history: Sequence[Mapping], path: str | os.PathLike, title: str = "MM-Rec") -> None:
    """Plot the train and validation loss of a Trainer run (``trainer.state.log_history``) to a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    curves = loss_history(log_history)
    if not curves["train"] and not curves["validation"]:
        raise ValueError("log_history holds no 'loss' or 'eval_loss' entries to plot")
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for name, style in (("train", "-"), ("validation", "o-")):
        if curves[name]:
            steps, losses = zip(*curves[name])
            ax.plot(steps, losses, style, label=f"{name} loss")
    if curves["validation"]:
        step, loss = curves["validation"][-1]
        ax.annotate(f"{loss:.3f} (ppl {math.exp(loss):.1f})", (step, loss), textcoords="offset points", xytext=(-60, 10))
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("cross-entropy (nats / token)")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
