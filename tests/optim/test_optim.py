"""The text encoder's own learning rate (model.params.cond_stage_lr, main.py --text_encoder_lr)."""
import importlib.util
from types import SimpleNamespace

import pytest
import torch
from omegaconf import OmegaConf

from ldm.util import UserError
from tests.helpers.models import build_tiny_model
from tests.helpers.repo import REPO


def one_step(model) -> torch.optim.Optimizer:
    """One optimizer step on a loss that reaches every trainable parameter."""
    optimizer = model.configure_optimizers()
    cond = model.get_learned_conditioning(["photo of a sks dog"])
    x = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    model.apply_model(x, torch.tensor([500]), cond).square().mean().backward()
    optimizer.step()
    return optimizer


def snapshot(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


def test_without_it_one_group_at_the_base_rate():
    model = build_tiny_model(cond_stage_trainable=True)
    model.learning_rate = 1e-3
    (group,) = model.configure_optimizers().param_groups
    assert group["lr"] == 1e-3 and len(group["params"]) == len(model.trainable_parameters())


def test_the_text_encoder_trains_at_its_own_rate():
    model = build_tiny_model(cond_stage_trainable=True, cond_stage_lr=0.0)
    model.learning_rate = 1e-3
    unet, text = snapshot(model.model), snapshot(model.cond_stage_model)
    optimizer = one_step(model)
    assert [g["lr"] for g in optimizer.param_groups] == [1e-3, 0.0]
    assert all(torch.equal(v, model.cond_stage_model.state_dict()[k]) for k, v in text.items())
    assert any(not torch.equal(v, model.model.state_dict()[k]) for k, v in unet.items())


def test_a_rate_for_a_frozen_text_encoder_is_an_error():
    with pytest.raises(UserError, match="the text encoder is frozen"):
        build_tiny_model(cond_stage_trainable=False, cond_stage_lr=1e-5)


def test_main_scales_it_with_the_base_rate(capsys):
    spec = importlib.util.spec_from_file_location("dreambooth_main_optim", REPO / "main.py")
    main = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(main)
    finetune = REPO / "configs" / "tiny" / "v1-finetune_unfrozen.yaml"
    config = OmegaConf.load(finetune)
    opt = main.get_parser().parse_args(["--base", str(finetune), "-t", "--text_encoder_lr", "2e-6"])
    main.apply_flags(config, opt)
    config.model.base_learning_rate, config.data.params.batch_size = 1e-5, 2
    model = SimpleNamespace(learning_rate=None, cond_stage_lr=config.model.params.cond_stage_lr)
    trainer = SimpleNamespace(accumulate_grad_batches=3, num_devices=1, num_nodes=1)
    main.set_learning_rate(model, config, trainer, scale_lr=True)
    assert model.learning_rate == pytest.approx(6e-5) and model.cond_stage_lr == pytest.approx(1.2e-5)
    assert "text encoder learning rate 1.20e-05" in capsys.readouterr().out
