"""The README's three workflow steps ("## The DreamBooth workflow"), run in order as written on the toy model, from a
folder outside the repository: class images with scripts/stable_txt2img.py, the fine-tune with main.py, samples
from its last.ckpt. Only the substitutions below change the commands (no weights or GPU here, and few steps)."""
import os
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from ldm.images import read_metadata
from tests.helpers.readme_text import fenced_blocks, join_continuations, section
from tests.helpers.repo import REPO

pytestmark = pytest.mark.e2e

ENV = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
# (as written, substituted): the toy model and its configs for Stable Diffusion v1, the CPU for a GPU, few steps and
# images, the run folder that step 2 made for `<run>`; the scripts and main.py of this repository
SUBSTITUTIONS = [("sd-v1-4-full-ema.ckpt", str(REPO / "data/toy/toy-v1.safetensors")),
                 ("configs/stable-diffusion/", str(REPO / "configs/toy") + "/"),
                 ("scripts/", str(REPO / "scripts") + "/"), ("main.py", str(REPO / "main.py")),
                 ("--n_samples 8 --n_iter 25", "--n_samples 2 --n_iter 1"), ("--ddim_steps 50", "--ddim_steps 2"),
                 ("--gpus 0,", "--accelerator cpu")]
APPENDED = {  # flags added at the end of each step's command
    1: ["--config", str(REPO / "configs/toy/v1-inference.yaml"), "--device", "cpu"],
    2: ["--max_steps", "2", "lightning.callbacks.eval_loss.params.every_n_steps=0",
        "lightning.callbacks.validation.params.every_n_steps=0"],
    3: ["--device", "cpu", "--ddim_steps", "2", "--n_samples", "1", "--n_iter", "1"]}


def workflow_commands() -> list[str]:
    """The bash blocks of the README's workflow section, each joined into one line."""
    blocks = fenced_blocks(section("## The DreamBooth workflow"), ("bash",))
    return [join_continuations(block).strip() for block in blocks]


def run_step(step: int, command: str, cwd: Path) -> subprocess.CompletedProcess:
    for written, substitute in SUBSTITUTIONS:
        command = command.replace(written, substitute)
    argv = shlex.split(command)
    assert argv[0] == "python", command
    proc = subprocess.run([sys.executable, *argv[1:], *APPENDED[step]], cwd=cwd, env=ENV, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, f"step {step}: {command}\n{proc.stdout[-2000:]}{proc.stderr[-3000:]}"
    return proc


def test_the_readme_workflow_runs_as_written_on_the_toy_model(tmp_path):
    commands = workflow_commands()
    assert len(commands) == 3 and "--outdir class_images/dog" in commands[0], commands
    assert "--reg_data_root class_images/dog " in commands[1] and "logs/<run>/checkpoints/last.ckpt" in commands[2]
    shutil.copytree(REPO / "data/toy/subject", tmp_path / "photos")
    run_step(1, commands[0], tmp_path)
    assert len(list((tmp_path / "class_images/dog/samples").glob("*.png"))) == 2
    trained = run_step(2, commands[1], tmp_path)
    assert "using its samples/ subfolder" in trained.stderr
    (run,) = (tmp_path / "logs").iterdir()
    assert run.name.endswith("_my_dog") and (run / "checkpoints/last.ckpt").is_file()
    run_step(3, commands[2].replace("logs/<run>", f"logs/{run.name}"), tmp_path)
    (sample,) = (tmp_path / "outputs/txt2img-samples/samples").glob("*.png")
    assert read_metadata(sample)["prompt"] == "photo of a sks dog on the beach"
