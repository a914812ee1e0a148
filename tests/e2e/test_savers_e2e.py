"""The memory savers through the real command line: the lowmem config trains and resumes, every optimizer resumes
from its last.ckpt, and the settings a fused backward cannot serve are one-line errors."""
import pytest
import torch

from ldm.models.diffusion.ddpm import DDPM
from ldm.optim.factory import state_tensors
from tests.helpers.repo import REPO, load_script
from tests.helpers.runs import fresh_run_args, make_class_images, make_photos, run_main

pytestmark = pytest.mark.e2e

LOWMEM = "configs/tiny/v1-finetune_lowmem.yaml"
OPTIMIZERS = {
    "adamw": [],
    "adamw8bit": ["--optimizer", "adamw8bit"],
    "adafactor": ["--optimizer", "adafactor"],
    "adamw fused into backward": ["--fused_backward"],
}


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("savers")
    return make_photos(root / "instance"), make_class_images(root / "class", 2), root


def train_and_resume(tiny_ckpt, folders, name: str, *extra: str) -> tuple[dict, dict]:
    """Two steps, then a resume to four; the two last.ckpt files."""
    instance, reg, root = folders
    logdir = root / name.replace(" ", "_")
    steps = ["--max_steps", "2", "lightning.modelcheckpoint.params.every_n_train_steps=100",
             "lightning.callbacks.image_logger.params.batch_frequency=100"]
    first = run_main(*fresh_run_args(tiny_ckpt, instance, reg, logdir, *steps, *extra))
    assert first.returncode == 0, first.stderr[-2000:]
    (run,) = logdir.iterdir()
    last = run / "checkpoints" / "last.ckpt"
    before = torch.load(last, map_location="cpu", weights_only=True)
    resumed = run_main("-r", str(run), "--max_steps", "4")
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert "Traceback" not in resumed.stderr
    return before, torch.load(last, map_location="cpu", weights_only=True)


def optimizer_bytes(checkpoint: dict) -> int:
    (state,) = checkpoint["optimizer_states"]
    return sum(t.numel() * t.element_size() for t in state_tensors(state["state"]))


@pytest.mark.parametrize("name", [name if name in ("adamw", "adamw8bit") else pytest.param(name, marks=pytest.mark.slow)
                                  for name in OPTIMIZERS])  # the other two: a second path through the same resume
def test_every_optimizer_resumes_from_its_last_ckpt(tiny_ckpt, folders, name):
    before, after = train_and_resume(tiny_ckpt, folders, name, *OPTIMIZERS[name])
    assert (before["global_step"], after["global_step"]) == (2, 4)
    unet = "model.diffusion_model.out.2.weight"
    assert not torch.equal(before["state_dict"][unet], after["state_dict"][unet])
    assert optimizer_bytes(after) > 0


def test_the_lowmem_config_trains_in_bf16_with_8_bit_state_and_resumes(tiny_ckpt, folders):
    before, after = train_and_resume(tiny_ckpt, folders, "lowmem",  # the compiled update: test_adamw8bit.py
                                     "model.params.optimizer.params.compile=false", "--base", LOWMEM)
    assert after["global_step"] == 4
    unet = after["state_dict"]["model.diffusion_model.out.2.weight"]
    assert unet.dtype == torch.bfloat16
    (state,) = after["optimizer_states"]
    assert {torch.int8, torch.uint8} <= {t.dtype for t in state_tensors(state["state"])}  # 8-bit moments
    assert sorted(p.name for p in (folders[2] / "lowmem").glob("*/cache/*")) == [
        "latents_reg.safetensors", "latents_train.safetensors"]


@pytest.mark.parametrize("setting, message", [
    ("lightning.trainer.accumulate_grad_batches=2", "accumulate_grad_batches 2"),
    ("lightning.trainer.gradient_clip_val=1.0", "gradient_clip_val 1.0"),
])
def test_a_fused_backward_refuses_what_needs_all_gradients(tiny_ckpt, folders, setting, message):
    instance, reg, root = folders
    proc = run_main(*fresh_run_args(tiny_ckpt, instance, reg, root / "refused", "--fused_backward", setting))
    assert proc.returncode == 1 and "Traceback" not in proc.stderr
    assert f"fused_backward (--fused_backward) does not work with {message}" in proc.stderr.strip().splitlines()[-1]


def test_a_cpu_run_zeroes_the_same_gradient_buffers_every_step(tiny_ckpt, folders, monkeypatch):
    kept, zero_grad = [], DDPM.optimizer_zero_grad

    def watched(self, epoch, batch_idx, optimizer):
        before = [p.grad for p in self.model.parameters()]
        zero_grad(self, epoch, batch_idx, optimizer)
        kept.append(all(g is not None and p.grad is g and not g.any() for p, g in zip(self.model.parameters(),
                                                                                      before)))
    monkeypatch.setattr(DDPM, "optimizer_zero_grad", watched)
    for name in ("PL_GLOBAL_SEED", "PL_SEED_WORKERS"):  # main's seed_everything sets them: restored after the test
        monkeypatch.setenv(name, "0")
    instance, reg, root = folders
    main = load_script("dreambooth_main", REPO / "main.py")
    assert main.main(fresh_run_args(tiny_ckpt, instance, reg, root / "in_place", "--max_steps", "3")) == 0
    assert kept == [False, True, True]  # the first step has no gradients yet
