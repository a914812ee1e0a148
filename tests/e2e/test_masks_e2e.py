"""Masked loss end to end: a run of main.py that trains with masks beside its photos, on cached latents."""
import subprocess
import sys

import pytest
from PIL import Image

from tests.data.test_masks import photo_with_mask
from tests.helpers.repo import REPO

pytestmark = pytest.mark.e2e


def test_a_run_trains_with_masks(tmp_path, tiny_ckpt):
    photos = tmp_path / "photos"
    photos.mkdir()
    for name in ("a", "b"):
        photo_with_mask(photos, name, size=(64, 64))
    classes = tmp_path / "class"
    classes.mkdir()
    for k in range(2):
        Image.new("RGB", (64, 64), (k * 90, 90, 90)).save(classes / f"c{k}.png")
    proc = subprocess.run([sys.executable, "main.py", "--base", "configs/tiny/v1-finetune_unfrozen.yaml", "-t",
                           "--actual_resume", str(tiny_ckpt), "-n", "m", "--accelerator", "cpu", "--data_root",
                           str(photos), "--reg_data_root", str(classes), "--class_word", "dog", "-l",
                           str(tmp_path / "logs"), "--max_steps", "2", "--cache_latents",
                           "data.params.train.params.mask_floor=0.1"],
                          cwd=REPO, capture_output=True, text=True, timeout=300,
                          env={"OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "PATH": "/usr/bin:/bin"})
    assert proc.returncode == 0, proc.stderr[-3000:]
