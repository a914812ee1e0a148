"""Packaging: the wheel holds the library, main.py, the scripts and the tokenizer files, with the console commands
and requirements.txt's dependencies; `pip install -e .` (into a fresh venv that borrows this one's packages) gives
commands that start from any folder (and sd-txt2img samples there). Built from a copy of the sources, so the
repository stays untouched."""
import re
import shutil
import subprocess
import sys
import sysconfig
import zipfile
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from setuptools import find_packages

from conftest import REPO, TINY_CONFIG

COMMANDS = {"sd-dreambooth-train": "main:main", "sd-txt2img": "dreambooth_scripts.stable_txt2img:main",
            "sd-img2img": "dreambooth_scripts.img2img:main", "sd-evaluate": "dreambooth_scripts.evaluate:main",
            "sd-compare": "dreambooth_scripts.compare:main", "sd-merge-lora": "dreambooth_scripts.merge_lora:main",
            "sd-prune-ckpt": "dreambooth_scripts.prune_ckpt:main", "sd-toy-demo": "dreambooth_scripts.toy_demo:main",
            "sd-gpu-check": "dreambooth_scripts.gpu_check:main"}
SOURCES = ("ldm", "scripts", "configs", "main.py", "setup.py", "pyproject.toml", "README.md", "requirements.txt",
           "requirements-test.txt")


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
            "ldm/modules/encoders/clip_tokenizer/merges.txt"} <= names
    assert dict(re.findall(r"^(\S+) = (\S+)$", entry_points, re.M)) == COMMANDS
    required = [Requirement(r) for r in re.findall(r"^Requires-Dist: (.+)$", metadata, re.M)]
    core = {(r.name.lower(), r.specifier) for r in required if r.marker is None}
    test_extra = {(r.name.lower(), r.specifier) for r in required if r.marker and r.marker.evaluate({"extra": "test"})}
    assert core == {(r.name.lower(), r.specifier) for r in map(Requirement, requirement_lines(
        REPO / "requirements.txt"))}
    assert test_extra == {(r.name.lower(), r.specifier) for r in map(Requirement, requirement_lines(
        REPO / "requirements-test.txt"))}


def test_an_editable_install_gives_commands_that_work_from_any_folder(source, tmp_path, tiny_ckpt):
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True, timeout=120)
    site = Path(subprocess.run([str(venv / "bin" / "python"), "-c", "import sysconfig; print(sysconfig.get_paths()"
                                "['purelib'])"], capture_output=True, text=True, check=True).stdout.strip())
    (site / "borrowed.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")  # this venv's torch and the rest
    pip("--python", str(venv / "bin" / "python"), "install", "-q", "--no-deps", "--no-build-isolation", "-e",
        str(source))
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    for command in ("sd-dreambooth-train", "sd-evaluate", "sd-toy-demo", "sd-gpu-check"):  # each imports torch
        proc = subprocess.run([str(venv / "bin" / command), "--help"], cwd=elsewhere, capture_output=True, text=True,
                              timeout=120)
        assert proc.returncode == 0 and proc.stdout.startswith(f"usage: {command}"), command + proc.stderr[-2000:]
    proc = subprocess.run([str(venv / "bin" / "sd-txt2img"), "--ckpt", str(tiny_ckpt), "--config", str(TINY_CONFIG),
                           "--prompt", "a dog", "--ddim_steps", "2", "--n_samples", "1", "--n_iter", "1", "--H", "64",
                           "--W", "64", "--outdir", "out", "--device", "cpu"],
                          cwd=elsewhere, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert len(list((elsewhere / "out" / "samples").glob("*.png"))) == 1
    imported = subprocess.run([str(venv / "bin" / "python"), "-c", "import ldm; print(ldm.__file__)"], cwd=elsewhere,
                              capture_output=True, text=True, check=True).stdout
    assert imported.startswith(str(source))
