"""CLIP skip end to end: `main.py --clip_skip` saves it in the run's config and trains with it, and stable_txt2img.py
samples with it, recorded in the PNG infotext."""
import os
import subprocess
import sys

import pytest
import torch
from omegaconf import OmegaConf
from PIL import Image

from ldm.images import read_metadata
from tests.helpers.other_tools import parse_infotext
from tests.helpers.repo import REPO
from tests.modules.test_clip_skip import make_photos, sample, train_args

pytestmark = pytest.mark.e2e
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}


def test_main_clip_skip_is_saved_trained_with_and_sampled_with(tmp_path, capsys, tiny_ckpt):
    photos, classes = make_photos(tmp_path / "photos"), make_photos(tmp_path / "class")
    proc = subprocess.run([sys.executable, "main.py", *train_args(tiny_ckpt, photos, classes, tmp_path / "logs",
                                                                  "--clip_skip", "2", "--max_steps", "1")],
                          cwd=REPO, env=ENV, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    (run,) = (tmp_path / "logs").iterdir()
    (saved,) = run.glob("configs/*-project.yaml")
    assert OmegaConf.load(saved).model.params.cond_stage_config.params.clip_skip == 2
    last = run / "checkpoints" / "last.ckpt"
    before = torch.load(tiny_ckpt, map_location="cpu")["state_dict"]
    after = torch.load(last, map_location="cpu")["state_dict"]
    layers = "cond_stage_model.transformer.text_model.encoder.layers."
    assert torch.equal(after[layers + "1.mlp.fc2.weight"], before[layers + "1.mlp.fc2.weight"])  # skipped: no grad
    assert not torch.equal(after[layers + "0.mlp.fc2.weight"], before[layers + "0.mlp.fc2.weight"])  # trained

    image = sample(capsys, last, tmp_path / "run-default")  # no --config: the run's saved config, clip_skip 2
    assert "Clip skip: 2" in Image.open(image).text["parameters"]
    assert parse_infotext(Image.open(image).text["parameters"])["Clip skip"] == "2"
    assert read_metadata(image)["clip_skip"] == 2
    image = sample(capsys, last, tmp_path / "run-override", "--clip_skip", "1")
    assert "Clip skip" not in Image.open(image).text["parameters"] and "clip_skip" not in read_metadata(image)
