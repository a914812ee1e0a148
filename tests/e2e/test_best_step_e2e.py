"""The best step end to end through main.py: a full run keeps its best step's weights through a resume and stops
early with its reason; a LoRA run keeps its LoRA file; a run whose monitors log nothing gives one line."""
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from ldm.checkpoint import read_state_dict
from tests.helpers.repo import REPO
from tests.helpers.runs import ENV, fresh_run_args, make_class_images, make_photos, metrics

pytestmark = pytest.mark.e2e

TESTS_ENV = {**ENV, "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), ENV.get("PYTHONPATH")]))}


def read_metadata(path: Path) -> dict[str, str]:
    with safe_open(str(path), "pt") as handle:
        return handle.metadata()


def scripted(values: list[float]) -> list[str]:
    """Overrides that score each validation round with tests/helpers/scripted_scorer.py, `values` in turn."""
    return ["lightning.callbacks.validation.params.every_n_steps=2",
            "lightning.callbacks.validation.params.scorer.target=tests.helpers.scripted_scorer.ScriptedScorer",
            f"lightning.callbacks.validation.params.scorer.params.values=[{','.join(map(str, values))}]"]


def run_main(*args: str) -> subprocess.CompletedProcess:
    proc = subprocess.run([sys.executable, "main.py", *args], cwd=REPO, env=TESTS_ENV, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert "Traceback" not in proc.stderr
    return proc


def test_a_run_keeps_its_best_step_through_a_resume_and_stops_early(tmp_path, tiny_ckpt):
    photos, reg = make_photos(tmp_path / "photos"), make_class_images(tmp_path / "class", 2)
    first = run_main(*fresh_run_args(tiny_ckpt, photos, reg, tmp_path / "logs", *scripted([0.5, 0.2])))
    (run,) = (tmp_path / "logs").iterdir()
    best, (config,) = run / "checkpoints" / "best.safetensors", run.glob("configs/*-project.yaml")
    assert f"INFO: best step: 2 by val/fidelity (max) 0.5000 (score 0.500): {best}\n" in first.stderr
    assert (f"INFO: sample the best step: python scripts/stable_txt2img.py --ckpt {best} --config {config} "
            '--prompt "photo of a sks dog"\n') in first.stderr
    step_2 = read_state_dict(run / "checkpoints" / "step_2.ckpt")
    kept = load_file(best)
    assert kept.keys() == step_2.keys() and all(torch.equal(kept[k], step_2[k]) for k in kept)
    written = best.read_bytes()

    resumed = run_main("-r", str(run), "--max_steps", "10", "lightning.callbacks.best_step.params.patience=2",
                       *scripted([0.3, 0.4]))
    assert best.read_bytes() == written  # step 6's 0.3 is below step 2's 0.5, which the resumed run knows
    assert ("INFO: stopped early at step 6: val/fidelity has not improved on 0.5000 (step 2) in 2 rounds "
            "(best_step.params.patience 2)\n") in resumed.stderr
    assert "summary: steps 4 to 6 (2 in this session)" in resumed.stderr
    assert torch.load(run / "checkpoints" / "last.ckpt", map_location="cpu")["global_step"] == 6
    logged = {int(r["step"]): float(r["val/fidelity"]) for r in metrics(run) if r.get("val/fidelity")}
    assert logged == {2: 0.5, 4: 0.2, 6: 0.3}


def test_a_lora_run_keeps_its_lora_file_and_a_missing_metric_is_one_line(tmp_path, tiny_ckpt):
    photos, reg = make_photos(tmp_path / "photos"), make_class_images(tmp_path / "class", 2)
    lora = run_main(*fresh_run_args(tiny_ckpt, photos, reg, tmp_path / "lora", "--rank", "4", *scripted([0.1, 0.9])))
    (run,) = (tmp_path / "lora").iterdir()
    best = run / "checkpoints" / "best.safetensors"
    kept, step_4 = load_file(best), load_file(run / "checkpoints" / "step_4.safetensors")  # the LoRA file
    assert kept.keys() == step_4.keys() and all(k.startswith("lora_") and torch.equal(kept[k], step_4[k]) for k in kept)
    assert read_metadata(best)["ss_steps"] == "4"
    assert f"--ckpt {tiny_ckpt} --lora {best} --config" in lora.stderr

    missing = run_main(*fresh_run_args(tiny_ckpt, photos, reg, tmp_path / "plain", "--max_steps", "2",
                                       "lightning.callbacks.validation.params.every_n_steps=2"))
    why = "validation has no scorer (clip_model, dino_model or scorer)"
    assert f"WARNING: best step: nothing will log val/fidelity: {why}\n" in missing.stderr
    assert (f"INFO: best step: none kept, no monitor logged val/fidelity (they logged nothing): {why}; "
            "lightning.callbacks.best_step.params.monitor names the metric\n") in missing.stderr
    (run,) = (tmp_path / "plain").iterdir()
    assert not (run / "checkpoints" / "best.safetensors").exists()
