"""End to end: --stop_text_encoder_training and a warmup schedule across resumes, before and past the stop step."""
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from ldm.callbacks import StepCheckpoint
from ldm.checkpoint import read_state_dict
from ldm.models.diffusion.ddpm import DDPM
from ldm.optim.factory import make_optimizer, optimizer_eval_mode
from ldm.util import UserError
from tests.helpers.models import build_tiny_model
from tests.helpers.repo import REPO, load_script
from tests.helpers.runs import TINY, fresh_run_args, make_class_images, make_photos, metrics, run_main

pytestmark = pytest.mark.e2e

TEXT = "cond_stage_model."


def weights(path: Path, prefix: str) -> dict[str, torch.Tensor]:
    return {k: v for k, v in torch.load(path, map_location="cpu")["state_dict"].items() if k.startswith(prefix)}


def same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def text_encoder_states(last: Path) -> int:
    """How many of the text encoder's parameters hold optimizer state (they come after the UNet's in the group)."""
    checkpoint = torch.load(last, map_location="cpu")
    n_unet = sum(1 for k in checkpoint["state_dict"] if k.startswith("model.diffusion_model."))
    return sum(1 for index in checkpoint["optimizer_states"][0]["state"] if index >= n_unet)


@pytest.fixture(scope="module")
def stopped_run(tmp_path_factory, tiny_ckpt) -> Path:
    """2 steps, then resumed to 4 across the stop step 3, then resumed past it to 5; a checkpoint every step."""
    root = tmp_path_factory.mktemp("recipe")
    photos, reg = make_photos(root / "photos"), make_class_images(root / "class", 2)
    proc = run_main(*fresh_run_args(tiny_ckpt, photos, reg, root / "logs", "--max_steps", "2",
                                    "--stop_text_encoder_training", "3", "--lr_scheduler", "constant_with_warmup",
                                    "--lr_warmup_steps", "4", "lightning.modelcheckpoint.params.every_n_train_steps=1"))
    assert proc.returncode == 0, proc.stderr[-3000:]
    (run,) = (root / "logs").iterdir()
    for max_steps in ("4", "5"):
        proc = run_main("-r", str(run), "--max_steps", max_steps)
        assert proc.returncode == 0, proc.stderr[-3000:]
        assert f"step {int(max_steps) - 1}: the text encoder is frozen from step 3 on" in proc.stderr
    return run


def test_the_text_encoder_trains_until_the_stop_step_and_never_after(stopped_run):
    folder = stopped_run / "checkpoints"
    text = {step: weights(folder / f"step_{step}.ckpt", TEXT) for step in (1, 2, 3, 4, 5)}
    unet = {step: weights(folder / f"step_{step}.ckpt", "model.diffusion_model.") for step in (3, 4, 5)}
    assert not same(text[1], text[2]) and not same(text[2], text[3])  # trained in steps 1 and 2, across a resume
    assert same(text[3], text[4]) and same(text[4], text[5])  # frozen from step 3, also after a resume past it
    assert not same(unet[3], unet[4]) and not same(unet[4], unet[5])  # the UNet goes on
    assert text_encoder_states(folder / "last.ckpt") == 0


@pytest.mark.slow  # 24 s: the stop and the resume are each tested above and in tests/training/
def test_a_fractional_stop_is_fixed_as_a_step_and_a_resume_never_trains_the_text_encoder_again(tmp_path, tiny_ckpt):
    """0.5 of 2 steps stops at step 1; resumed to 6 (0.5 of it would be 3), then to 7 with a later stop flag."""
    photos, reg = make_photos(tmp_path / "photos"), make_class_images(tmp_path / "class", 2)
    quick = ["lightning.modelcheckpoint.params.every_n_train_steps=1",
             "lightning.callbacks.image_logger.params.disabled=true"]
    proc = run_main(*fresh_run_args(tiny_ckpt, photos, reg, tmp_path / "logs", "--max_steps", "2",
                                    "--stop_text_encoder_training", "0.5", *quick))
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "the text encoder trains until step 1 (0.5 of max_steps 2" in proc.stderr
    (run,) = (tmp_path / "logs").iterdir()
    assert "cond_stage_stop_step: 1\n" in "".join(p.read_text() for p in (run / "configs").glob("*.yaml"))
    for extra in (["--max_steps", "6"], ["--max_steps", "7", "--stop_text_encoder_training", "100"]):
        proc = run_main("-r", str(run), *extra)
        assert proc.returncode == 0, proc.stderr[-3000:]
    folder = run / "checkpoints"
    text = [weights(folder / f"step_{step}.ckpt", TEXT) for step in range(1, 8)]
    assert all(same(text[0], later) for later in text[1:])
    assert not same(*(weights(folder / f"step_{step}.ckpt", "model.diffusion_model.") for step in (6, 7)))


def flagged_config(main, *flags: str, base: str = TINY):
    """main.py's config of `base` with main.py's `flags` applied."""
    config = main.load_run_config([str(REPO / base)], [])
    main.apply_flags(config, main.get_parser().parse_args(["--base", TINY, "-t", *flags]))
    return config


def test_step_fractions_become_steps_once_so_a_longer_resume_keeps_them():
    main = load_script("dreambooth_main_recipe", REPO / "main.py")
    config = flagged_config(main, "--stop_text_encoder_training", "0.5", "--lr_warmup_steps", "0.1")
    main.fix_step_fractions(config, 100)
    assert config.model.params.cond_stage_stop_step == 50 and config.model.params.lr_schedule.warmup_steps == 10
    main.fix_step_fractions(config, 260)  # a resume with a larger --max_steps reads the saved config
    assert config.model.params.cond_stage_stop_step == 50 and config.model.params.lr_schedule.warmup_steps == 10


def test_the_warmup_goes_on_where_the_resume_left_it(stopped_run):
    rates = {int(row["step"]): float(row["train/lr"]) for row in metrics(stopped_run) if row.get("train/lr")}
    assert sorted(rates) == [0, 1, 2, 3, 4]
    assert [rates[step] for step in range(5)] == pytest.approx([0.0, 2.5e-5, 5e-5, 7.5e-5, 1e-4], rel=1e-5)


def test_the_recipe_flags_go_into_the_config_that_the_run_saves():
    main = load_script("dreambooth_main_recipe", REPO / "main.py")
    config = flagged_config(main, "--stop_text_encoder_training", "0.5", "--lr_warmup_steps", "0.1")
    assert config.model.params.cond_stage_stop_step == 0.5
    assert dict(config.model.params.lr_schedule) == {"warmup_steps": 0.1, "name": "constant_with_warmup"}
    config = flagged_config(main, "--lr_scheduler", "cosine")
    assert dict(config.model.params.lr_schedule) == {"name": "cosine"}
    toy = flagged_config(main, "--freeze_text_encoder", base="configs/toy/v1-finetune_unfrozen.yaml")
    assert toy.model.params.cond_stage_stop_step is None  # the toy recipe's stop step gives way to the flag


def test_a_stop_below_one_is_a_fraction_of_max_steps_and_needs_a_trained_text_encoder():
    model = build_tiny_model(cond_stage_trainable=True, cond_stage_stop_step=0.5)
    model.trainer = SimpleNamespace(max_steps=10)
    assert model.text_encoder_stop_step() == 5
    with pytest.raises(UserError, match=r"cond_stage_stop_step 3 \(--stop_text_encoder_training\) is set but the text "
                                        "encoder is frozen"):
        build_tiny_model(cond_stage_trainable=False, cond_stage_stop_step=3)
    with pytest.raises(UserError, match="--stop_text_encoder_training 0: expected a step"):
        build_tiny_model(cond_stage_trainable=True, cond_stage_stop_step=0)


def test_the_model_builds_the_optimizer_its_config_names():
    pytest.importorskip("lion_pytorch", reason="lion-pytorch is not installed (pip install lion-pytorch)")
    model = build_tiny_model(optimizer={"target": "lion", "params": {"betas": [0.9, 0.98]}})
    model.learning_rate = 1e-4
    optimizer = model.configure_optimizers()
    assert type(optimizer).__name__ == "Lion" and optimizer.param_groups[0]["betas"] == [0.9, 0.98]
    assert len(optimizer.param_groups[0]["params"]) == len(model.trainable_parameters())


class StepWeights(torch.nn.Linear):
    """A small module that writes its step files as the model does (DDPM's)."""
    weights_suffix = DDPM.weights_suffix
    save_step_weights = DDPM.save_step_weights
    step_state_dict = DDPM.step_state_dict


def test_checkpoints_hold_a_schedule_free_optimizers_evaluation_weights(tmp_path):
    pytest.importorskip("schedulefree", reason="schedulefree is not installed (pip install schedulefree)")
    torch.manual_seed(0)
    module = StepWeights(4, 4)
    optimizer = make_optimizer({"target": "schedulefree_adamw"}, module.parameters(), 0.1)
    for _ in range(3):
        module(torch.randn(8, 4)).square().mean().backward()
        optimizer.step()
        optimizer.zero_grad()
    training = {k: v.clone() for k, v in module.state_dict().items()}
    with optimizer_eval_mode(optimizer):
        evaluation = {k: v.clone() for k, v in module.state_dict().items()}
    assert not torch.equal(training["weight"], evaluation["weight"])
    trainer = SimpleNamespace(optimizers=[optimizer], is_global_zero=True, global_step=3)
    StepCheckpoint(dirpath=str(tmp_path)).save_weights(trainer, module, tmp_path / "step_3.ckpt")
    saved = read_state_dict(tmp_path / "step_3.ckpt")
    assert all(torch.equal(saved[k], evaluation[k]) for k in evaluation)
    for key, value in module.state_dict().items():  # the training weights are back (up to the round trip's rounding)
        torch.testing.assert_close(value, training[key], rtol=0, atol=1e-6)
