"""scripts/toy_methods.py end to end on the committed toy model, briefly (2 steps, 1 sample per prompt, 2 DDIM steps):
a full fine-tune, the LoRA extracted from it, textual inversion and pivotal tuning train, sample and are scored
through the real command lines; a second invocation runs nothing again and writes the same report, the first one's
commands included. The rates are not checked here (2 steps teach nothing)."""
import json
import os
import subprocess
import sys

import pytest

from ldm.toy.methods import BY_SLUG
from tests.helpers.repo import REPO

pytestmark = [pytest.mark.e2e, pytest.mark.slow]  # 80 s: what it runs, other tests cover command by command

ENV = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
METHODS = ("full", "extracted16", "ti", "pivotal8")


def run_driver(outdir, *extra: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "scripts/toy_methods.py", "--outdir", str(outdir), "--methods", *METHODS,
                           "--seeds", "1", "--samples", "1", "--class_images", "2", "--ddim_steps", "2",
                           "--max_steps", "2", *extra],
                          cwd=REPO, env=ENV, capture_output=True, text=True, timeout=600)


def test_the_methods_driver_trains_samples_scores_and_resumes(tmp_path):
    outdir = tmp_path / "methods"
    proc = run_driver(outdir)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    results = {path.stem: json.loads(path.read_text()) for path in (outdir / "results").glob("*.json")}
    assert set(results) == {"base", *(f"{slug}-seed23" for slug in METHODS)}
    assert results["ti-seed23"]["flags"][0] == "--embedding"
    assert results["pivotal8-seed23"]["flags"][::2] == ["--lora", "--embedding"]
    assert results["extracted16-seed23"]["flags"][0] == "--lora" and results["extracted16-seed23"]["file_bytes"] > 0
    assert results["full-seed23"]["trainable_parameters"] > results["pivotal8-seed23"]["trainable_parameters"] > 0
    report = (outdir / "methods.md").read_text()
    for slug in METHODS:
        assert BY_SLUG[slug].label in report
    assert (outdir / "methods.png").stat().st_size > 0
    again = run_driver(outdir)
    assert again.returncode == 0, again.stderr[-3000:]
    assert "[fine-tune]" not in again.stdout and "[samples]" not in again.stdout
    assert "extract_lora.py" in report and (outdir / "methods.md").read_text() == report  # commands of both runs
