"""diffusers pipeline folders end to end: main.py trains from our folder and txt2img samples from it."""
import subprocess
import sys

import pytest

from tests.callbacks.test_monitors import make_folder
from tests.checkpoint.test_diffusers_folders import our_folder, tiny_file  # fixtures
from tests.helpers.repo import REPO

pytestmark = pytest.mark.e2e


def test_training_and_sampling_start_from_a_diffusers_folder(our_folder, tmp_path):
    photos, class_images = make_folder(tmp_path / "photos", 2, 0), make_folder(tmp_path / "class", 2, 1)
    env = {"OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "PATH": "/usr/bin:/bin"}
    proc = subprocess.run([sys.executable, "main.py", "--base", "configs/tiny/v1-finetune_unfrozen.yaml", "-t",
                           "--actual_resume", str(our_folder), "-n", "job", "--accelerator", "cpu", "--data_root",
                           str(photos), "--reg_data_root", str(class_images), "--class_word", "dog", "-l",
                           str(tmp_path / "logs"), "--max_steps", "2"],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert f"{our_folder}: loaded UNet 286, VAE 180, noise schedule 12, text encoder 36" in proc.stderr
    proc = subprocess.run([sys.executable, "scripts/stable_txt2img.py", "--ckpt", str(our_folder), "--prompt", "a dog",
                           "--ddim_steps", "2", "--n_samples", "1", "--n_iter", "1", "--outdir", str(tmp_path / "out"),
                           "--device", "cpu"], cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "using the sizes of the diffusers folder" in proc.stderr
    assert len(list((tmp_path / "out" / "samples").glob("*.png"))) == 1
