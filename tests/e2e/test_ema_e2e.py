"""EMA end to end: main.py keeps it in step files and last.ckpt, a resume carries it on, and txt2img samples with it
under --use_ema."""
import subprocess
import sys

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf
from PIL import Image

from ldm.checkpoint import read_state_dict
from ldm.images import read_metadata
from ldm.inference.loading import load_model
from tests.callbacks.test_monitors import make_folder
from tests.helpers.repo import REPO

pytestmark = pytest.mark.e2e
ENV = {"OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "PATH": "/usr/bin:/bin"}


def run(*args):
    proc = subprocess.run([sys.executable, *args], cwd=REPO, env=ENV, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


def test_ema_in_step_files_resumes_and_samples(tmp_path, tiny_ckpt):
    photos, classes = make_folder(tmp_path / "photos", 2, 0), make_folder(tmp_path / "class", 2, 1)
    run("main.py", "--base", "configs/tiny/v1-finetune_unfrozen.yaml", "-t", "--actual_resume", str(tiny_ckpt), "-n",
        "ema", "--accelerator", "cpu", "--data_root", str(photos), "--reg_data_root", str(classes), "--class_word",
        "dog", "-l", str(tmp_path / "logs"), "model.params.use_ema=true", "model.params.ema_decay=0.5",
        "model.base_learning_rate=0.01")
    (folder,) = (tmp_path / "logs").iterdir()
    step = read_state_dict(folder / "checkpoints" / "step_4.ckpt")
    unet_key = "model.diffusion_model.out.2.weight"
    ema_key = "model_ema.diffusion_modelout2weight"
    assert int(step["model_ema.num_updates"]) == 4 and float(step["model_ema.decay"]) == 0.5
    assert not torch.equal(step[ema_key], step[unet_key])  # the average lags the trained weights
    last = torch.load(folder / "checkpoints" / "last.ckpt", map_location="cpu")
    assert torch.equal(last["state_dict"][ema_key], step[ema_key])

    run("main.py", "-r", str(folder), "--max_steps", "6")
    resumed = torch.load(folder / "checkpoints" / "last.ckpt", map_location="cpu")["state_dict"]
    assert int(resumed["model_ema.num_updates"]) == 6

    config = OmegaConf.load(next((folder / "configs").glob("*-project.yaml")))
    assert config.model.params.use_ema
    model = load_model(config, str(folder / "checkpoints" / "last.ckpt"), torch.device("cpu"), use_ema=True)
    assert not hasattr(model, "model_ema") and torch.equal(model.state_dict()[unet_key], resumed[ema_key])
    images = {}
    for flag in ([], ["--use_ema"]):
        out = tmp_path / ("ema" if flag else "plain")
        run("scripts/stable_txt2img.py", "--ckpt", str(folder / "checkpoints" / "last.ckpt"), "--prompt", "a dog",
            "--ddim_steps", "2", "--n_samples", "1", "--n_iter", "1", "--outdir", str(out), "--device", "cpu", *flag)
        (path,) = (out / "samples").glob("*.png")
        images[bool(flag)] = np.asarray(Image.open(path))
        assert read_metadata(path).get("ema", False) is bool(flag)
    assert not np.array_equal(images[True], images[False])
