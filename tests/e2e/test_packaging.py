"""Packaging: the wheel holds the library, main.py, the scripts, the tokenizer files and the project's configs and toy
data, with the console commands and requirements.txt's dependencies; `pip install .` (into a fresh venv that borrows
this one's packages) gives commands that each run a real job from a folder outside the repository. Built from a copy
of the sources, so the repository stays untouched."""
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import sysconfig
import zipfile
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from setuptools import find_packages

from tests.helpers.repo import REPO

pytestmark = pytest.mark.e2e

COMMANDS = {"sd-dreambooth-train": "main:main", "sd-txt2img": "dreambooth_scripts.stable_txt2img:main",
            "sd-img2img": "dreambooth_scripts.img2img:main", "sd-evaluate": "dreambooth_scripts.evaluate:main",
            "sd-compare": "dreambooth_scripts.compare:main", "sd-merge-lora": "dreambooth_scripts.merge_lora:main",
            "sd-extract-lora": "dreambooth_scripts.extract_lora:main",
            "sd-prune-ckpt": "dreambooth_scripts.prune_ckpt:main", "sd-toy-demo": "dreambooth_scripts.toy_demo:main",
            "sd-gpu-check": "dreambooth_scripts.gpu_check:main"}
SOURCES = ("ldm", "scripts", "configs", "data", "main.py", "setup.py", "pyproject.toml", "README.md",
           "requirements.txt", "requirements-test.txt")


def requirement_lines(path: Path) -> list[str]:
    lines = (line.split("#")[0].strip() for line in path.read_text().splitlines())
    return [line for line in lines if line and not line.startswith("-r")]


@pytest.fixture(scope="module")
def source(tmp_path_factory) -> Path:
    copy = tmp_path_factory.mktemp("source") / "repo"
    copy.mkdir()
    for name in SOURCES:
        if (REPO / name).is_dir():
            shutil.copytree(REPO / name, copy / name, ignore=shutil.ignore_patterns("__pycache__"))
        else:
            shutil.copy(REPO / name, copy / name)
    return copy


def pip(*args: str) -> subprocess.CompletedProcess:
    proc = subprocess.run([sys.executable, "-m", "pip", *args], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    return proc


def test_the_wheel_holds_the_packages_commands_and_dependencies(source, tmp_path):
    pip("wheel", "--no-deps", "--no-build-isolation", "-q", "-w", str(tmp_path), str(source))
    (wheel,) = tmp_path.glob("*.whl")
    with zipfile.ZipFile(wheel) as archive:
        names = set(archive.namelist())
        info = next(n for n in names if n.endswith(".dist-info/METADATA")).rsplit("/", 1)[0]
        entry_points = archive.read(f"{info}/entry_points.txt").decode()
        metadata = archive.read(f"{info}/METADATA").decode()
    packages = find_packages(str(REPO), include=["ldm", "ldm.*"])
    assert {f"{p.replace('.', '/')}/__init__.py" for p in packages} <= names
    assert {"main.py", "dreambooth_scripts/stable_txt2img.py", "ldm/modules/encoders/clip_tokenizer/vocab.json",
            "ldm/modules/encoders/clip_tokenizer/merges.txt", "dreambooth_configs/toy/v1-finetune_unfrozen.yaml",
            "dreambooth_configs/stable-diffusion/v1-inference.yaml", "dreambooth_data/toy/toy-v1.safetensors",
            "dreambooth_data/toy/scorer.safetensors", "dreambooth_data/toy/subject/subject-1.png",
            "dreambooth_data/dreambench/prompts_and_classes.json"} <= names
    assert dict(re.findall(r"^(\S+) = (\S+)$", entry_points, re.M)) == COMMANDS
    required = [Requirement(r) for r in re.findall(r"^Requires-Dist: (.+)$", metadata, re.M)]
    core = {(r.name.lower(), r.specifier) for r in required if r.marker is None}
    test_extra = {(r.name.lower(), r.specifier) for r in required if r.marker and r.marker.evaluate({"extra": "test"})}
    assert core == {(r.name.lower(), r.specifier) for r in map(Requirement, requirement_lines(
        REPO / "requirements.txt"))}
    assert test_extra == {(r.name.lower(), r.specifier) for r in map(Requirement, requirement_lines(
        REPO / "requirements-test.txt"))}


def installed_venv(source: Path, root: Path) -> Path:
    """A fresh venv that borrows this one's packages (torch and the rest), with the project installed into it from
    `source` (a real install, not an editable one: the configs, toy weights and tokenizer come from the package)."""
    venv = root / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True, timeout=120)
    site = Path(subprocess.run([str(venv / "bin" / "python"), "-c", "import sysconfig; print(sysconfig.get_paths()"
                                "['purelib'])"], capture_output=True, text=True, check=True).stdout.strip())
    (site / "borrowed.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    pip("--python", str(venv / "bin" / "python"), "install", "-q", "--no-deps", "--no-build-isolation", str(source))
    return venv


def command(venv: Path, cwd: Path, name: str, *args: str) -> str:
    """Run one console command of the venv in `cwd`; its output."""
    proc = subprocess.run([str(venv / "bin" / name), *args], cwd=cwd, capture_output=True, text=True, timeout=600,
                          env={**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"})
    assert proc.returncode == 0, f"{name} {shlex.join(args)}\n{proc.stdout[-2000:]}{proc.stderr[-3000:]}"
    return proc.stdout + proc.stderr


def test_every_command_runs_a_real_job_from_another_folder(source, tmp_path):
    """One job of each console command, in a folder outside the repository, on the toy model; paths are the user's
    (relative to that folder), and configs/... and data/... that are not there are the package's own."""
    venv, elsewhere = installed_venv(source, tmp_path), tmp_path / "elsewhere"
    elsewhere.mkdir()
    toy = ["--config", "configs/toy/v1-inference.yaml"]
    cheap = ["--ddim_steps", "2", "--n_samples", "1", "--n_iter", "1", "--device", "cpu"]
    command(venv, elsewhere, "sd-toy-demo", "--quick", "--max_steps", "2")
    report = json.loads((elsewhere / "outputs/demo/report.json").read_text())
    assert report["quick"] is True and not (source / "outputs").exists()
    (demo_run,) = (elsewhere / "outputs/demo/runs/dreambooth").iterdir()
    command(venv, elsewhere, "sd-dreambooth-train", "--base", "configs/toy/v1-finetune_lora.yaml", "-t",
            "--actual_resume", "data/toy/toy-v1.safetensors", "-n", "lora", "--accelerator", "cpu", "--data_root",
            "outputs/demo/class_images/samples", "--class_word", "ball", "--rank", "2", "--max_steps", "1",
            "data.params.reg=null", "lightning.callbacks.eval_loss.params.every_n_steps=0",
            "lightning.callbacks.validation.params.every_n_steps=0")
    (lora,) = (elsewhere / "logs").glob("*_lora/checkpoints/last.safetensors")
    command(venv, elsewhere, "sd-merge-lora", "data/toy/toy-v1.safetensors", str(lora.relative_to(elsewhere)),
            "-o", "merged.safetensors", *toy)
    command(venv, elsewhere, "sd-prune-ckpt", str((demo_run / "checkpoints/last.ckpt").relative_to(elsewhere)), "-o",
            "pruned.safetensors")
    command(venv, elsewhere, "sd-extract-lora", "pruned.safetensors", "--base", "data/toy/toy-v1.safetensors", "-o",
            "extracted.safetensors", "--rank", "4", *toy)
    assert (elsewhere / "extracted.safetensors").is_file()
    command(venv, elsewhere, "sd-txt2img", "--ckpt", "merged.safetensors", *toy, "--prompt", "a ball", *cheap)
    (sample,) = (elsewhere / "outputs/txt2img-samples/samples").glob("*.png")
    command(venv, elsewhere, "sd-img2img", "--ckpt", "pruned.safetensors", *toy, "--init-img",
            str(sample.relative_to(elsewhere)), "--prompt", "a sks ball", "--strength", "0.5", "--outdir", "img2img",
            *cheap)
    assert list((elsewhere / "img2img/samples").glob("*.png"))
    (elsewhere / "prompts.txt").write_text("a photo of a sks ball\n")
    command(venv, elsewhere, "sd-compare", "--model", "base=data/toy/toy-v1.safetensors", "--model",
            "dreambooth=pruned.safetensors", *toy, "--scorer", "toy", "--prompts", "prompts.txt", "--n", "1",
            "--steps", "2", "--device", "cpu")
    assert (elsewhere / "outputs/compare/table.md").is_file()
    command(venv, elsewhere, "sd-evaluate", "--model", "pruned.safetensors", *toy, "--scorer", "toy", "--photos",
            "outputs/demo/class_images/samples", "--class_word", "ball", "--prompts", "prompts.txt", "--n", "1",
            "--steps", "2", "--device", "cpu")
    assert (elsewhere / "outputs/eval/summary.json").is_file()
    command(venv, elsewhere, "sd-gpu-check", "--tiny", "--device", "cpu", "--stages", "sdpa", "--out", "check.json")
    assert json.loads((elsewhere / "check.json").read_text())["stages"]["sdpa"]["status"] == "ok"
    imported = subprocess.run([str(venv / "bin" / "python"), "-c", "import ldm; print(ldm.__file__)"], cwd=elsewhere,
                              capture_output=True, text=True, check=True).stdout
    assert imported.startswith(str(venv))
