"""Several subjects end to end: a run of main.py from repeated --data_root/--token flags, with per-concept losses."""
import csv
import os
import subprocess
import sys

import pytest
from omegaconf import OmegaConf

from tests.data.test_concepts import TINY, folders  # folders: a fixture
from tests.helpers.repo import REPO

pytestmark = pytest.mark.e2e


def test_main_trains_two_subjects_from_repeated_flags(tmp_path, tiny_ckpt, folders):
    logdir = tmp_path / "logs"
    args = ["--base", TINY, "-t", "--actual_resume", str(tiny_ckpt), "-n", "two", "--accelerator", "cpu",
            "-l", str(logdir), "--data_root", folders["dog"], "--token", "sks", "--class_word", "dog",
            "--reg_data_root", folders["dogs"], "--data_root", folders["toy"], "--token", "zwx", "--class_word", "toy",
            "--reg_data_root", folders["toys"], "--max_steps", "6", "data.params.batch_size=2",
            "lightning.callbacks.eval_loss.params.every_n_steps=3", "lightning.callbacks.eval_loss.params.timesteps=2",
            "lightning.callbacks.eval_loss.params.bands=1"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    result = subprocess.run([sys.executable, "main.py", *args], cwd=REPO, env=env, capture_output=True, text=True,
                            timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "instance images (zwx): 3 in" in result.stdout and "class images (sks): 2 in" in result.stdout
    run = next(logdir.iterdir())
    saved = OmegaConf.load(next((run / "configs").glob("*-project.yaml")))
    assert [c.identifier for c in saved.data.params.concepts] == ["sks", "zwx"]
    rows = list(csv.DictReader(open(next((run / "csv").glob("*/metrics.csv")))))
    columns = set(rows[0])
    assert {"train/loss_instance_sks", "train/loss_instance_zwx", "val/loss_instance_sks",
            "val/loss_instance_zwx"} <= columns
    assert any(row["train/loss_instance_zwx"] for row in rows) and any(row["val/loss_instance_sks"] for row in rows)
    assert (run / "checkpoints" / "last.ckpt").is_file()

    bad = subprocess.run([sys.executable, "main.py", *args[:-6], "--token", "extra"], cwd=REPO, env=env,
                         capture_output=True, text=True, timeout=120)
    assert bad.returncode == 1 and "need as many identifiers" in bad.stderr and "Traceback" not in bad.stderr
