"""Monitors end to end through main.py: the evaluation loss, validation samples and previews in a run, and reloading a
step checkpoint gives the logged evaluation loss exactly."""
import csv
import os
import subprocess
import sys

import pytest
from omegaconf import OmegaConf

from ldm.callbacks.eval_loss import EvaluationLoss
from ldm.checkpoint import load_model_weights
from ldm.images import read_metadata
from ldm.util import instantiate_from_config
from tests.callbacks.test_monitors import folders  # a fixture
from tests.helpers.models import save_tiny_scorers
from tests.helpers.repo import REPO

pytestmark = pytest.mark.e2e
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}


def read_metrics(run):
    rows = []
    for path in sorted(run.glob("csv/*/metrics.csv")):
        with open(path, newline="") as handle:
            rows += list(csv.DictReader(handle))
    return rows


def test_monitors_in_a_training_run_and_the_logged_loss_after_reloading(tmp_path, tiny_ckpt, folders):
    clip_dir, _ = save_tiny_scorers(tmp_path / "scorers")
    photos, class_images = folders
    proc = subprocess.run(
        [sys.executable, "main.py", "--base", "configs/tiny/v1-finetune_unfrozen.yaml", "-t", "--actual_resume",
         str(tiny_ckpt), "-n", "job", "--accelerator", "cpu", "--data_root", str(photos), "--reg_data_root",
         str(class_images), "--class_word", "dog", "-l", str(tmp_path / "logs"),
         "lightning.callbacks.eval_loss.params.every_n_steps=2",
         "lightning.callbacks.validation.params.every_n_steps=2",
         f"lightning.callbacks.validation.params.clip_model={clip_dir}",
         "lightning.callbacks.image_logger.params.preview_every=1",
         "data.params.train.params.caption_dropout=1.0"],  # every caption empty: the image logger uses the dataset's
        cwd=REPO, env=ENV, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-4000:]
    (run,) = (tmp_path / "logs").iterdir()
    rows = read_metrics(run)
    logged = {int(r["step"]): r for r in rows if r.get("val/loss")}
    assert sorted(logged) == [2, 4]
    assert all(r["val/loss_t0-249"] and r["val/loss_class"] for r in logged.values())
    clip_rows = [r for r in rows if r.get("val/clip_t")]
    assert [int(r["step"]) for r in clip_rows] == [2, 4]
    assert all(-1 <= float(r["val/clip_t"]) <= 1 and -1 <= float(r["val/clip_i"]) <= 1 for r in clip_rows)

    validation = run / "images" / "validation"
    assert sorted(p.name for p in validation.iterdir()) == [
        "progression.png", "step_000002", "step_000002.png", "step_000004", "step_000004.png"]
    assert sorted(p.name for p in (validation / "step_000004").iterdir()) == [
        f"p{k}_s{seed}.png" for k in range(3) for seed in (0, 1)]
    assert len(list((run / "images" / "train").glob("previews_instance_gs-000002*.png"))) == 1
    (grid,) = (run / "images" / "train").glob("samples_instance_gs-000002*.png")
    assert read_metadata(grid)["prompt"] == "photo of a sks dog"

    config = OmegaConf.load(next((run / "configs").glob("*-project.yaml")))
    model = instantiate_from_config(config.model)
    load_model_weights(model, str(run / "checkpoints" / "step_2.ckpt"))
    data = instantiate_from_config(config.data)
    data.setup()
    lightning = OmegaConf.load(next((run / "configs").glob("*-lightning.yaml"))).lightning
    again = EvaluationLoss(**lightning.callbacks.eval_loss.params).evaluate(model, data.datasets())
    assert again["val/loss"] == float(logged[2]["val/loss"])
    assert again["val/loss_t750-999"] == float(logged[2]["val/loss_t750-999"])
