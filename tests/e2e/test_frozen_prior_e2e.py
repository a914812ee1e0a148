"""`--prior frozen_model` through main.py: a full fine-tune trains without any class image, writes the checkpoints it
writes today (no key more), resumes with its frozen copy read from the base checkpoint, and refuses in one line when
that file is gone; a LoRA run with EMA trains the same way and keeps the average in last.ckpt."""
import shutil

import pytest
import torch
from omegaconf import OmegaConf

from ldm.checkpoint import read_lora, read_state_dict, save_weights
from tests.helpers.models import build_tiny_model, randomise_zero_init
from tests.helpers.runs import TINY, make_photos, metrics, run_main

pytestmark = pytest.mark.e2e

LORA = "configs/tiny/v1-finetune_lora.yaml"
QUIET = ["lightning.callbacks.image_logger.params.batch_frequency=100"]


def args(config: str, base, photos, logdir, *extra: str) -> list[str]:
    return ["--base", config, "-t", "--actual_resume", str(base), "-n", "prior", "--accelerator", "cpu",
            "--data_root", str(photos), "--class_word", "dog", "-l", str(logdir), "--prior", "frozen_model",
            "--max_steps", "2", *QUIET, *extra]


def test_a_full_fine_tune_needs_no_class_images_and_resumes_from_its_base(tmp_path, tiny_ckpt):
    base, photos, logs = tmp_path / "base.ckpt", make_photos(tmp_path / "photos"), tmp_path / "logs"
    shutil.copy(tiny_ckpt, base)
    proc = run_main(*args(TINY, base, photos, logs))
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "a frozen copy of the UNet and the text encoder holds" in proc.stderr
    assert "its predictions took" in proc.stderr
    (run,) = logs.iterdir()
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["last.ckpt", "step_2.ckpt"]
    assert set(read_state_dict(run / "checkpoints" / "step_2.ckpt")) == set(read_state_dict(tiny_ckpt))
    last = torch.load(run / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
    assert set(last["state_dict"]) == set(read_state_dict(tiny_ckpt))
    class_losses = [float(row["train/loss_class"]) for row in metrics(run) if row.get("train/loss_class")]
    assert len(class_losses) == 2 and class_losses[0] < 1e-6 < class_losses[1]  # the base's own target at step 0
    config = OmegaConf.load(next((run / "configs").glob("*-project.yaml")))
    assert config.model.params.prior_preservation == "frozen_model" and config.data.params.reg is None
    assert config.model.params.prior_base_checkpoint == str(base)

    resumed = run_main("-r", str(run), "--max_steps", "3", *QUIET)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert f"read from the base checkpoint {base}" in resumed.stderr
    base.unlink()
    gone = run_main("-r", str(run), "--max_steps", "4", *QUIET)
    assert gone.returncode != 0 and "Traceback" not in gone.stderr
    assert gone.stderr.strip().splitlines()[-1].startswith("error:") and "prior_base_checkpoint" in gone.stderr


def test_a_lora_run_with_ema_trains_without_class_images(tmp_path):
    photos, logs, base = make_photos(tmp_path / "photos"), tmp_path / "logs", tmp_path / "base.ckpt"
    save_weights(randomise_zero_init(build_tiny_model()).state_dict(), base)  # every LoRA module gets a gradient
    proc = run_main(*args(LORA, base, photos, logs, "--rank", "4", "model.params.use_ema=true",
                          "model.params.ema_decay=0.5"))
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "the LoRA switched off (no copy: 0 MB)" in proc.stderr
    (run,) = logs.iterdir()
    folder = run / "checkpoints"
    assert sorted(p.name for p in folder.iterdir()) == ["last.ckpt", "last.safetensors", "step_2.safetensors"]
    state = torch.load(folder / "last.ckpt", map_location="cpu", weights_only=True)["state_dict"]
    assert int(state["model_ema.num_updates"]) == 2
    up = next(key for key in state if key.endswith(".lora_B.default.weight") and state[key].any())
    averaged = state["model_ema." + up.replace(".", "")]
    assert not torch.equal(averaged, state[up])  # the average lags the trained LoRA
    tensors, _ = read_lora(folder / "step_2.safetensors")
    assert any(torch.equal(value.flatten(), averaged.flatten()) for value in tensors.values())
