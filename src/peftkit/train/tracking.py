"""Where a training run's numbers go besides ``train_log.jsonl``: an experiment tracker (TensorBoard,
Weights & Biases or MLflow, through Hugging Face Accelerate's trackers) and ``loss_curve.png``.

TensorBoard's event files land in ``OUTPUT/logs/`` (``tensorboard --logdir OUTPUT/logs``). Weights &
Biases and MLflow read their usual settings from the environment (``WANDB_PROJECT``, ``WANDB_MODE=offline``,
``MLFLOW_TRACKING_URI``, ...).
"""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path
from typing import Any, Literal

ReportTo = Literal["auto", "tensorboard", "wandb", "mlflow", "none"]
RUN_NAME = "logs"  # OUTPUT/logs/: the tracker's folder (TensorBoard's event files)
CURVE = "loss_curve.png"

# What each tracker needs installed: (module, pip package).
_NEEDS = {"tensorboard": ("tensorboard", "tensorboard"), "wandb": ("wandb", "wandb"), "mlflow": ("mlflow", "mlflow")}


def resolve_report_to(report_to: str) -> str | None:
    """The Accelerate tracker name for ``report_to`` (``None``: no tracker). ``auto`` is TensorBoard when
    it is installed; a tracker chosen by name must be installed, else a ValueError says how to get it."""
    if report_to == "none":
        return None
    if report_to == "auto":
        return "tensorboard" if importlib.util.find_spec("tensorboard") is not None else None
    if report_to not in _NEEDS:
        raise ValueError(f"report_to must be one of auto, tensorboard, wandb, mlflow, none; got {report_to!r}.")
    module, package = _NEEDS[report_to]
    if importlib.util.find_spec(module) is None:
        raise ValueError(f"--report-to {report_to}: the {package} package is not installed; pip install {package} "
                         "(or choose --report-to none).")
    return report_to


def tracker_config(config: dict[str, Any]) -> dict[str, Any]:
    """The run's settings flattened to the scalar values trackers accept (``format.template`` -> text)."""
    out: dict[str, Any] = {}
    for key, value in config.items():
        if isinstance(value, dict):
            out.update({f"{key}.{k}": v for k, v in tracker_config(value).items()})
        else:
            out[key] = value if isinstance(value, (int, float, str, bool)) else str(value)
    return out


def write_loss_curve(log_path: Path, png_path: Path) -> bool:
    """Plot training loss and held-out loss against the step from ``train_log.jsonl``; False if nothing was logged."""
    records = [json.loads(line) for line in log_path.read_text(encoding="utf-8").splitlines() if line.strip()] if log_path.is_file() else []
    train = [(r["step"], r["loss"]) for r in records if "loss" in r]
    held_out = [(r["step"], r["eval_loss"]) for r in records if "eval_loss" in r]
    if not train and not held_out:
        return False
    import matplotlib

    matplotlib.use("Agg")  # files only, no display
    import matplotlib.pyplot as plt

    from ..io.files import atomic_write

    fig, ax = plt.subplots(figsize=(7, 4.2))
    for points, label, style in ((train, "training loss", "-"), (held_out, "held-out loss", "o--")):
        if points:
            ax.plot(*zip(*points), style, label=label)
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("mean token cross-entropy")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    try:
        atomic_write(png_path, lambda tmp: fig.savefig(tmp, format="png", dpi=120))
    finally:
        plt.close(fig)
    return True


__all__ = ["CURVE", "RUN_NAME", "ReportTo", "resolve_report_to", "tracker_config", "write_loss_curve"]
