"""Half-precision export end to end: a run of main.py with `--save_precision fp16` writes fp16 step files and a
full-precision last.ckpt, which scripts/prune_ckpt.py turns into fp16 weights."""
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf
from safetensors.torch import load_file

from ldm.checkpoint import export_weights, load_model_weights, read_state_dict
from tests.checkpoint.test_export import assert_precision, is_weight
from tests.helpers.models import build_tiny_model
from tests.helpers.other_tools import check_a1111_ckpt
from tests.helpers.repo import REPO
from tests.helpers.runs import ENV, fresh_run_args, make_class_images, make_photos, run_main

pytestmark = pytest.mark.e2e


@pytest.fixture(scope="module")
def fp16_run(tmp_path_factory, tiny_ckpt) -> Path:
    """The checkpoint folder of a 2-step run with step files every step, `--save_precision fp16 --safetensors`."""
    root = tmp_path_factory.mktemp("fp16-run")
    photos, reg = make_photos(root / "instance"), make_class_images(root / "class", 2)
    every_step = "lightning.modelcheckpoint.params.every_n_train_steps=1"
    proc = run_main(*fresh_run_args(tiny_ckpt, photos, reg, root / "logs", "--max_steps", "2", "--safetensors",
                                    "--save_precision", "fp16", every_step))
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    (run,) = (root / "logs").iterdir()
    return run


def test_run_with_save_precision_fp16_writes_fp16_step_files_and_a_full_precision_last_ckpt(fp16_run, tiny_ckpt):
    folder = fp16_run / "checkpoints"
    assert sorted(p.name for p in folder.iterdir()) == ["last.ckpt", "last.safetensors", "step_1.ckpt",
                                                        "step_1.safetensors", "step_2.ckpt", "step_2.safetensors"]
    last = torch.load(folder / "last.ckpt", map_location="cpu", weights_only=True)
    assert last["global_step"] == 2 and last["optimizer_states"]
    assert {v.dtype for v in last["state_dict"].values()} == {torch.float32}
    for name in ("step_2.ckpt", "step_2.safetensors", "last.safetensors"):
        state = read_state_dict(folder / name)
        assert set(state) == set(last["state_dict"])
        assert {v.dtype for k, v in state.items() if is_weight(k, v)} == {torch.float16}, name
    assert_precision(read_state_dict(folder / "last.safetensors"), last["state_dict"], torch.float16)
    assert (folder / "step_2.ckpt").stat().st_size < 0.55 * tiny_ckpt.stat().st_size  # tiny_ckpt: fp32 weights
    check_a1111_ckpt(folder / "step_2.ckpt")
    mapped = torch.load(folder / "step_2.ckpt", map_location="cpu", weights_only=True, mmap=True)["state_dict"]
    assert mapped["model.diffusion_model.out.2.weight"].dtype == torch.float16
    (saved,) = (fp16_run / "configs").glob("*-lightning.yaml")
    assert OmegaConf.load(saved).lightning.modelcheckpoint.params.save_precision == "fp16"


PRUNED_LINE = re.compile(r"wrote (.+): (\d+\.\d) MB, (\d+) tensors, (\w+)( \(.*\))?")


def test_prune_a_resumable_last_ckpt_to_fp16_weights(fp16_run, tmp_path):
    last = fp16_run / "checkpoints" / "last.ckpt"
    out = tmp_path / "dog.ckpt"
    proc = subprocess.run([sys.executable, "scripts/prune_ckpt.py", str(last), "-o", str(out), "--precision", "fp16"],
                          cwd=REPO, env=ENV, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    (line,) = proc.stdout.strip().splitlines()
    path, megabytes, tensors, precision, details = PRUNED_LINE.fullmatch(line).groups()
    full = torch.load(last, map_location="cpu", weights_only=True)
    assert (path, int(tensors), precision) == (str(out), len(full["state_dict"]), "fp16")
    assert float(megabytes) == round(out.stat().st_size / 1e6, 1) and "optimizer_states" in details
    pruned = torch.load(out, map_location="cpu", weights_only=True)
    assert set(pruned) == {"state_dict"}
    assert_precision(pruned["state_dict"], full["state_dict"], torch.float16)
    assert out.stat().st_size < last.stat().st_size / 4
    check_a1111_ckpt(out)
    report = load_model_weights(build_tiny_model(), out)
    assert not report.unexpected and report.loaded["UNet"] > 0
    as_stored = export_weights(last, tmp_path / "dog.safetensors")
    assert as_stored.precision == "fp32"
    assert_precision(load_file(tmp_path / "dog.safetensors"), full["state_dict"], torch.float32)
