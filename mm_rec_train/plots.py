"""The loss curve of a run."""

from __future__ import annotations

import math
import os
from typing import Dict, List, Mapping, Sequence

FINAL = "final_evaluation"  # marks the run's final, full held-out evaluation in a log history


def loss_history(log_history: Sequence[Mapping]) -> Dict[str, List[tuple]]:
    """Trainer's ``state.log_history`` -> {"train": [(step, loss)], "validation": [(step, eval_loss)],
    "final": [(step, eval_loss)]}: the periodic evaluations, and the final one (entries marked
    ``FINAL``, at the step whose weights the run kept), by step."""
    def points(keep):
        return sorted((entry["step"], entry[key]) for entry in log_history
                      for key in ("loss", "eval_loss") if key in entry and "step" in entry and keep(entry, key))

    return {"train": points(lambda e, key: key == "loss"),
            "validation": points(lambda e, key: key == "eval_loss" and not e.get(FINAL)),
            "final": points(lambda e, key: key == "eval_loss" and bool(e.get(FINAL)))}


def save_loss_curve(log_history: Sequence[Mapping], path: str | os.PathLike, title: str = "MM-Rec") -> None:
    """Plot the train and validation loss of a Trainer run (``trainer.state.log_history``) to a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    curves = loss_history(log_history)
    if not any(curves.values()):
        raise ValueError("log_history holds no 'loss' or 'eval_loss' entries to plot")
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for name, style, label in (("train", "-", "train loss"), ("validation", "o-", "validation loss"),
                               ("final", "*", "final validation loss (all held-out text, the kept weights)")):
        if curves[name]:
            steps, losses = zip(*curves[name])
            ax.plot(steps, losses, style, markersize=12 if name == "final" else 6, label=label)
    if curves["final"] or curves["validation"]:
        step, loss = (curves["final"] or curves["validation"])[-1]
        ax.annotate(f"{loss:.3f} (ppl {math.exp(loss):.1f})", (step, loss), textcoords="offset points", xytext=(-60, 10))
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("cross-entropy (nats / token)")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
