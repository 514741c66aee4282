"""`peftkit train --report-to`: TensorBoard event files through Accelerate's tracker, readable by
TensorBoard itself, with the numbers of train_log.jsonl; the loss-curve PNG; a missing tracker refused."""

from __future__ import annotations

import importlib.util
import json

import pytest

import tiny_pipeline as tiny
from peftkit.cli import main
from peftkit.train import TrainConfig
from peftkit.train.tracking import resolve_report_to, write_loss_curve

PNG = b"\x89PNG\r\n\x1a\n"


def test_tensorboard_event_file_holds_the_logged_losses(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    model_dir = tiny.model_dir(tmp_path)
    data = tiny.write_jsonl(tmp_path / "train.jsonl", tiny.dialogue_rows(12))
    held_out = tiny.write_jsonl(tmp_path / "dev.jsonl", tiny.dialogue_rows(4, seed=9))
    out = tmp_path / "run"
    assert main(["train", "--model", model_dir, "--data", data, "--eval-data", held_out, "--output", str(out),
                 "--max-steps", "3", "--log-every", "1", "--eval-every", "2", "--batch-size", "4", "--lr", "1e-2",
                 "--max-source-tokens", "48", "--precision", "fp32", "--report-to", "tensorboard"]) == 0
    log = [json.loads(line) for line in (out / "train_log.jsonl").read_text().splitlines()]
    events = list((out / "logs").rglob("events.out.tfevents.*"))
    assert events, sorted(p.name for p in out.rglob("*"))
    acc = EventAccumulator(str(events[0].parent))
    acc.Reload()
    tags = acc.Tags()["scalars"]
    assert {"loss", "eval_loss", "lr", "grad_norm"} <= set(tags)
    logged = {r["step"]: r["loss"] for r in log if "loss" in r}
    assert {e.step: e.value for e in acc.Scalars("loss")} == pytest.approx(logged, rel=1e-6)  # float32 in the file
    assert logged.keys() == {1, 2, 3}
    eval_logged = {r["step"]: r["eval_loss"] for r in log if "eval_loss" in r}
    assert {e.step: e.value for e in acc.Scalars("eval_loss")} == pytest.approx(eval_logged, rel=1e-6)
    assert eval_logged.keys() == {0, 2, 3}  # before training, every 2 steps, and at the end
    curve = (out / "loss_curve.png").read_bytes()
    assert curve.startswith(PNG) and len(curve) > 5_000
    assert json.loads((out / "run.json").read_text())["config"]["report_to"] == "tensorboard"


def test_a_tracker_that_is_not_installed_is_refused_with_the_fix():
    assert resolve_report_to("none") is None
    assert resolve_report_to("auto") == ("tensorboard" if importlib.util.find_spec("tensorboard") else None)
    for name in ("wandb", "mlflow"):
        if importlib.util.find_spec(name) is None:
            with pytest.raises(ValueError, match=f"the {name} package is not installed; pip install {name}"):
                resolve_report_to(name)
    with pytest.raises(ValueError, match="report_to must be one of auto, tensorboard, wandb, mlflow, none"):
        TrainConfig(report_to="comet")


def test_loss_curve_without_a_log_writes_nothing(tmp_path):
    assert write_loss_curve(tmp_path / "missing.jsonl", tmp_path / "curve.png") is False
    assert not (tmp_path / "curve.png").exists()
