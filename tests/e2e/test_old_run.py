"""A run written before the package's redesign (issue 35) by the code of commit a61b643: a LoRA run on the tiny config,
2 steps, its folder, configs, last.ckpt and LoRA files in tests/fixtures/old-run. Today's code resumes it to the
very LoRA weights that the old code resumed it to, and samples its LoRA into the old code's very pixels."""
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from ldm.checkpoint import save_weights
from tests.helpers.models import build_tiny_model
from tests.helpers.repo import REPO

pytestmark = pytest.mark.e2e

FIXTURE = REPO / "tests" / "fixtures" / "old-run"
OLD_RUN = FIXTURE / "2026-12-07T03-49-10_old"
OLD_BASE = "/tmp/oldbase/base.ckpt"  # where the base was when the run trained: the config names it
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}


def run(*args: str) -> subprocess.CompletedProcess:
    result = subprocess.run([sys.executable, *args], cwd=REPO, env=ENV, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    return result


@pytest.fixture
def moved_run(tmp_path) -> tuple[Path, Path]:
    """The old run folder and its base checkpoint (the same seeded tiny weights), moved to `tmp_path`: the run's
    saved config names the base where it is now, as a user who moves a run and its base would edit it."""
    base = tmp_path / "base.ckpt"
    save_weights(build_tiny_model().state_dict(), base)
    folder = tmp_path / OLD_RUN.name
    shutil.copytree(OLD_RUN, folder)
    (config,) = (folder / "configs").glob("*-project.yaml")
    config.write_text(config.read_text().replace(OLD_BASE, str(base)))
    return folder, base


def test_an_old_run_resumes_to_the_weights_the_old_code_reached(moved_run):
    folder, _ = moved_run
    run("main.py", "-r", str(folder), "--max_steps", "3")
    resumed, expected = load_file(folder / "checkpoints" / "last.safetensors"), load_file(
        FIXTURE / "expected-step3-lora.safetensors")
    assert resumed.keys() == expected.keys() and len(expected) == 252
    assert all(torch.equal(resumed[key], expected[key]) for key in expected)


def test_an_old_runs_lora_samples_the_old_codes_pixels(moved_run, tmp_path):
    _, base = moved_run
    (config,) = (OLD_RUN / "configs").glob("*-project.yaml")
    run("scripts/stable_txt2img.py", "--ckpt", str(base), "--lora", str(OLD_RUN / "checkpoints" / "last.safetensors"),
        "--config", str(config), "--prompt", "photo of a sks dog", "--ddim_steps", "3", "--n_samples", "2",
        "--n_iter", "1", "--seed", "0", "--outdir", str(tmp_path / "out"), "--device", "cpu", "--skip_grid")
    samples = np.stack([np.asarray(Image.open(tmp_path / "out" / "samples" / f"{k:05}.png")) for k in range(2)])
    assert np.array_equal(samples, np.load(FIXTURE / "expected-samples.npy"))
