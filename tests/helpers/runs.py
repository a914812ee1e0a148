"""Runs of main.py on the tiny config in a subprocess, on photos and class images made by the test."""
import csv
import os
import subprocess
import sys
from pathlib import Path

from PIL import Image

from tests.helpers.repo import REPO

TINY = "configs/tiny/v1-finetune_unfrozen.yaml"
# One thread per process: on a few shared cores, PyTorch's default threads make the tiny model many times slower.
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}


def make_photos(folder: Path) -> Path:
    """Instance photos as users have them: JPEG and PNG of odd sizes, one EXIF-rotated, one RGBA."""
    folder.mkdir(parents=True)
    Image.new("RGB", (97, 71), (200, 60, 40)).save(folder / "dog1.jpg", quality=90)
    Image.new("RGB", (100, 64), (40, 160, 60)).save(folder / "dog2.png")
    exif = Image.Exif()
    exif[0x0112] = 6
    Image.new("RGB", (90, 66), (30, 30, 200)).save(folder / "IMG_0003.JPG", exif=exif)
    Image.new("RGBA", (70, 70), (250, 200, 0, 128)).save(folder / "dog4.png")
    return folder


def make_class_images(folder: Path, n: int) -> Path:
    folder.mkdir(parents=True)
    for k in range(n):
        Image.new("RGB", (64, 64), (k * 60, 90, 90)).save(folder / f"real-{k}.png")
    return folder


def run_main(*args: str, timeout: int = 300) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "main.py", *args], cwd=REPO, env=ENV, capture_output=True, text=True,
                          timeout=timeout)


def fresh_run_args(ckpt: Path, instance: Path, reg: Path, logdir: Path, *extra: str) -> list[str]:
    return ["--base", TINY, "-t", "--actual_resume", str(ckpt), "-n", "job", "--accelerator", "cpu",
            "--data_root", str(instance), "--reg_data_root", str(reg), "--class_word", "dog", "-l", str(logdir), *extra]


def metrics(run: Path) -> list[dict[str, str]]:
    rows = []
    for path in sorted(run.glob("csv/*/metrics.csv")):
        with open(path, newline="") as handle:
            rows += list(csv.DictReader(handle))
    return rows
