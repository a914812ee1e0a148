"""Aspect buckets end to end: a run of main.py that trains with them."""
import subprocess
import sys

import pytest
from PIL import Image

from tests.data.test_buckets import photos  # a fixture
from tests.helpers.repo import REPO

pytestmark = pytest.mark.e2e


def test_a_run_trains_with_buckets(photos, tmp_path, tiny_ckpt):
    classes = tmp_path / "class"
    classes.mkdir()
    for k, size in enumerate([(192, 192), (260, 130), (192, 192)]):
        Image.new("RGB", size, (k * 80, 90, 90)).save(classes / f"c{k}.png")
    overrides = [f"data.params.{part}.params.{key}" for part in ("train", "reg")
                 for key in ("buckets=true", "crop=none", "size=192")]
    proc = subprocess.run([sys.executable, "main.py", "--base", "configs/tiny/v1-finetune_unfrozen.yaml", "-t",
                           "--actual_resume", str(tiny_ckpt), "-n", "b", "--accelerator", "cpu", "--data_root",
                           str(photos), "--reg_data_root", str(classes), "--class_word", "dog", "-l",
                           str(tmp_path / "logs"), "data.params.batch_size=2",
                           "lightning.callbacks.eval_loss.params.every_n_steps=2", *overrides],
                          cwd=REPO, capture_output=True, text=True, timeout=300,
                          env={"OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "PATH": "/usr/bin:/bin"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "evaluation loss" in proc.stderr
    (run,) = (tmp_path / "logs").iterdir()
    assert len(list((run / "images" / "train").glob("inputs_*.png"))) == 2
