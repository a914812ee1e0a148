"""The committed toy base model samples at its native size, and the demo end to end in its quick mode (few steps and
samples): every stage runs through the real command lines in a subprocess and writes what it should; the rates are
not checked here (the demo's own report checks them)."""
import json
import os
import subprocess
import sys

import pytest
from omegaconf import OmegaConf
from PIL import Image

from ldm.images import read_metadata
from ldm.toy.demo import PROMPTS
from tests.helpers.repo import REPO
from tests.toy.test_toy_demo import BASE, TOY

pytestmark = pytest.mark.e2e

ENV = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}


def test_base_model_samples_at_its_native_size_without_size_flags(tmp_path):
    proc = subprocess.run([sys.executable, "scripts/stable_txt2img.py", "--ckpt", str(BASE), "--config",
                           str(TOY / "v1-inference.yaml"), "--prompt", "a photo of a red ball", "--n_samples", "2",
                           "--n_iter", "1", "--ddim_steps", "3", "--outdir", str(tmp_path)],
                          cwd=REPO, env=ENV, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    samples = sorted((tmp_path / "samples").glob("*.png"))
    assert len(samples) == 2 and Image.open(samples[0]).size == (64, 64)


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    outdir = tmp_path_factory.mktemp("demo") / "demo"
    proc = subprocess.run([sys.executable, "scripts/toy_demo.py", "--quick", "--drift", "--threads", "1",
                           "--outdir", str(outdir), "--set", "model.params.reg_weight=0.9"],
                          cwd=REPO, env=ENV, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return outdir, proc.stdout


def test_every_stage_writes_its_files(demo):
    outdir, _ = demo
    class_images = sorted((outdir / "class_images" / "samples").glob("*.png"))
    assert len(class_images) == 2 and read_metadata(class_images[0])["prompt"] == "a photo of a ball"
    for name, reg_weight in (("dreambooth", 0.9), ("no-prior", 0)):  # --set applies, the drift run's 0 after it
        (run,) = (outdir / "runs" / name).iterdir()
        assert {p.name for p in (run / "checkpoints").iterdir()} >= {"step_2.ckpt", "step_4.ckpt", "last.ckpt"}
        (config,) = (run / "configs").glob("*-project.yaml")
        assert OmegaConf.load(config).model.params.reg_weight == reg_weight
        assert any((run / "images" / "train").glob("samples_instance_*.png"))
    for model in ("base", "fine-tuned", "reg_weight_0"):
        samples = sorted((outdir / "samples" / model / "samples").glob("*.png"))
        assert len(samples) == 2 * len(PROMPTS)
        assert {read_metadata(p)["prompt"] for p in samples} == set(PROMPTS)
        assert {read_metadata(p)["seed"] for p in samples} == {1000, 1001}  # the same seeds for every prompt
    assert {p.name for p in (outdir / "logs").iterdir()} == {
        "class-images.log", "dreambooth.log", "no-prior.log", "samples-base.log", "samples-fine-tuned.log",
        "samples-reg_weight_0.log"}


def test_report_parses_and_names_every_prompt_model_and_target(demo):
    outdir, stdout = demo
    report = json.loads((outdir / "report.json").read_text())
    assert report["quick"] is True and set(report["rates"]) == {"base", "fine-tuned", "reg_weight 0"}
    for rates in report["rates"].values():
        assert set(rates) == set(PROMPTS)
        assert all(0 <= r["subject"] <= 1 and r["samples"] == 2 for r in rates.values())
    assert len(report["targets"]) == 5 and all(isinstance(t["met"], bool) for t in report["targets"])
    assert set(report["stages"]) == {"class images", "fine-tune", "samples", "scoring"}
    fine_tune = "python main.py --base configs/toy/v1-finetune_unfrozen.yaml -t"
    assert any(c.startswith(fine_tune) for c in report["commands"])
    markdown = (outdir / "report.md").read_text()
    assert "Quick mode" in markdown and all(prompt in markdown for prompt in PROMPTS)
    with Image.open(outdir / "report.png") as picture:
        assert picture.width > 7 * 128 and picture.height > 3 * 128  # 7 prompt columns, 3 model rows
    assert "identifier binding" in stdout and "report.md" in stdout
