"""The optimizer choice (model.params.optimizer): fused AdamW by default, Adafactor, Prodigy, Lion, schedule-free
AdamW, 8-bit AdamW; and the spec's fused_backward and stochastic_rounding keys."""
import logging
import sys

import pytest
import torch
from omegaconf import OmegaConf
from pytorch_lightning.core.optimizer import LightningOptimizer

from ldm.checkpoint import read_checkpoint, save_checkpoint
from ldm.optim.factory import OPTIONAL, adamw, is_schedule_free, make_optimizer, optimizer_eval_mode
from ldm.optim.per_parameter import PerParameterOptimizer
from ldm.util import UserError


def needs(name: str) -> None:
    """Skip, saying which pip command would run the test, when the optional optimizer's package is missing."""
    if name in OPTIONAL:
        module, _, package = OPTIONAL[name]
        pytest.importorskip(module, reason=f"{module} is not installed (pip install {package})")


def least_squares(seed: int = 0) -> tuple[torch.nn.Linear, torch.Tensor, torch.Tensor]:
    """A linear model and a problem that it can solve exactly."""
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(64, 4, generator=generator)
    y = x @ torch.randn(4, 1, generator=generator) + 0.1
    torch.manual_seed(seed)
    return torch.nn.Linear(4, 1), x, y


def mse(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    """The model's mean squared error."""
    with torch.no_grad():
        return torch.nn.functional.mse_loss(model(x), y).item()


def train(model: torch.nn.Module, optimizer: torch.optim.Optimizer, x: torch.Tensor, y: torch.Tensor,
          steps: int) -> None:
    """`steps` full-batch steps on the mean squared error."""
    for _ in range(steps):
        optimizer.zero_grad()
        torch.nn.functional.mse_loss(model(x), y).backward()
        optimizer.step()


def test_no_spec_is_todays_fused_adamw():
    (a, x, y), (b, _, _) = least_squares(), least_squares()
    mine, today = make_optimizer(None, a.parameters(), 1e-2), adamw(b.parameters(), 1e-2)
    assert type(mine) is type(today) is torch.optim.AdamW
    assert mine.defaults == today.defaults  # fused where this torch can
    train(a, mine, x, y, 5)
    train(b, today, x, y, 5)
    assert all(torch.equal(p, q) for p, q in zip(a.parameters(), b.parameters()))


def test_adamw_by_name_is_the_same_fused_adamw():
    model, _, _ = least_squares()
    optimizer = make_optimizer({"target": "adamw", "params": {"weight_decay": 0.0}}, model.parameters(), 1e-2)
    reference = adamw(least_squares()[0].parameters(), 1e-2, weight_decay=0.0)
    assert type(optimizer) is torch.optim.AdamW and optimizer.defaults == reference.defaults


# name, base lr, the second (text-encoder-like) group's own lr, one option and its value
CASES = [
    ("adamw", 5e-2, 1e-2, "weight_decay", 0.0),
    ("adafactor", 5e-2, 1e-2, "beta2_decay", -0.5),
    ("adamw8bit", 5e-2, 1e-2, "weight_decay", 0.0),
    ("adamw8bit_torch", 5e-2, 1e-2, "weight_decay", 0.0),
    ("prodigy", 1.0, 0.0, "d_coef", 0.5),  # Prodigy takes one lr for all groups, or 0
    ("lion", 3e-2, 1e-2, "weight_decay", 1e-3),
    ("schedulefree_adamw", 5e-2, 1e-2, "warmup_steps", 5),
    ("torch.optim.SGD", 5e-2, 1e-2, "momentum", 0.9),
]


@pytest.mark.parametrize("name, lr, group_lr, option, value", CASES, ids=[case[0] for case in CASES])
def test_each_optimizer_takes_its_options_and_groups_and_learns(name, lr, group_lr, option, value):
    needs(name)
    model, x, y = least_squares()
    groups = [{"params": [model.weight]}, {"params": [model.bias], "lr": group_lr}]
    spec = OmegaConf.create({"target": name, "params": {option: value}})  # as it comes from the config
    optimizer = make_optimizer(spec, groups, lr)
    assert [group["lr"] for group in optimizer.param_groups] == [lr, group_lr]
    assert optimizer.defaults[option] == value
    before = mse(model, x, y)
    train(model, optimizer, x, y, 50)
    with optimizer_eval_mode(optimizer):  # the weights a schedule-free run samples and saves
        assert mse(model, x, y) < 0.5 * before
    assert [group["lr"] for group in optimizer.param_groups] == [lr, group_lr]


@pytest.mark.parametrize("name, lr, group_lr, option, value", CASES, ids=[case[0] for case in CASES])
def test_each_optimizer_resumes_from_its_state_in_a_checkpoint_file(tmp_path, name, lr, group_lr, option, value):
    """The optimizer's state through save_checkpoint and the safe reader of last.ckpt, then 5 more steps, gives the
    weights of 5 more uninterrupted steps."""
    needs(name)
    spec = OmegaConf.create({"target": name, "params": {option: value}})

    def setup() -> tuple[torch.nn.Linear, torch.optim.Optimizer]:
        model, x, y = least_squares()
        return model, make_optimizer(spec, [{"params": [model.weight]}, {"params": [model.bias], "lr": group_lr}],
                                     lr)

    _, x, y = least_squares()
    model, optimizer = setup()
    train(model, optimizer, x, y, 5)
    save_checkpoint({"state_dict": model.state_dict(), "optimizer_states": [optimizer.state_dict()]},
                    tmp_path / "last.ckpt")
    train(model, optimizer, x, y, 5)
    saved = read_checkpoint(tmp_path / "last.ckpt")
    resumed, again = setup()
    resumed.load_state_dict(saved["state_dict"])
    again.load_state_dict(saved["optimizer_states"][0])
    train(resumed, again, x, y, 5)
    for expected, found in zip(model.parameters(), resumed.parameters()):
        torch.testing.assert_close(found, expected, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("name", sorted(OPTIONAL))
def test_a_missing_package_names_the_pip_command(name, monkeypatch):
    module, _, package = OPTIONAL[name]
    monkeypatch.setitem(sys.modules, module, None)  # `import module` now fails as if it were not installed
    model, _, _ = least_squares()
    with pytest.raises(UserError, match=f"model.params.optimizer {name} needs the {package} package: "
                                        f"pip install {package}$"):
        make_optimizer({"target": name}, model.parameters(), 1.0)


def test_an_unknown_name_lists_the_known_ones():
    with pytest.raises(UserError, match="unknown optimizer 'adam'; known names are adamw, adamw8bit_torch, adafactor, "
                                        "prodigy, lion, schedulefree_adamw, adamw8bit, or give a dotted class path"):
        make_optimizer({"target": "adam"}, least_squares()[0].parameters(), 1e-3)


@pytest.mark.parametrize("spec, message", [
    ({"target": "adamw", "params": {"beta": 0.9}}, "adamw has no option beta; it takes amsgrad, betas"),
    ({"target": "adamw", "params": {"fused": False}}, "adamw has no option fused"),
    ({"target": "torch.optim.SGD", "params": {"moment": 0.9}}, "torch.optim.SGD has no option moment"),
    ({"target": "adamw", "params": {"lr": 1e-4}}, "set the learning rate with model.base_learning_rate"),
    ({"target": "adamw", "params": {"eps": -1.0}}, "adamw: Invalid epsilon value"),
    ({"target": "adamw", "lr": 1e-4}, r"unknown keys \['lr'\]; expected 'target', 'params', 'fused_backward', "
                                      "'stochastic_rounding'"),
    ({"fused_backwards": True}, r"unknown keys \['fused_backwards'\]"),
    ({"fused_backward": "yes"}, "fused_backward: expected true or false, got 'yes'"),
    ({"stochastic_rounding": 1}, "stochastic_rounding: expected true or false, got 1"),
    ({"fused_backward": True, "params": {"lr": 1e-4}}, "target is missing"),  # options belong to a named optimizer
    ({"fused_backward": True, "target": "adamw", "params": {"lr": 1e-4}}, "set the learning rate with"),
    ({"fused_backward": True, "target": "adamw", "params": {"beta": 0.9}}, "adamw has no option beta"),
    ({"params": {}}, "target is missing"),
    ({}, "target is missing"),
    ({"target": "torch.optim.Adamw"}, "torch.optim.Adamw: cannot import it"),
    ({"target": "torch.nn.Linear"}, "torch.nn.Linear is not a torch.optim.Optimizer class"),
])
def test_a_bad_spec_is_a_clear_error(spec, message):
    with pytest.raises(UserError, match=message):
        make_optimizer(spec, least_squares()[0].parameters(), 1e-3)


def test_an_unknown_keyword_of_an_optional_optimizer_names_it():
    needs("lion")
    with pytest.raises(UserError, match="lion has no option d_coef; it takes .*betas"):
        make_optimizer({"target": "lion", "params": {"d_coef": 1.0}}, least_squares()[0].parameters(), 1e-4)


def test_prodigy_takes_one_learning_rate_for_all_groups():
    needs("prodigy")
    model, _, _ = least_squares()
    groups = [{"params": [model.weight]}, {"params": [model.bias], "lr": 0.2}]
    with pytest.raises(UserError, match="parameter group 1 has lr 0.2 but Prodigy takes one learning rate"):
        make_optimizer({"target": "prodigy"}, groups, 1.0)


@pytest.mark.parametrize("lr, warns", [(1e-4, True), (1.0, False)])
def test_prodigy_warns_about_a_small_learning_rate(lr, warns, caplog):
    needs("prodigy")
    with caplog.at_level(logging.WARNING, logger="ldm.optim.factory"):
        make_optimizer({"target": "prodigy"}, least_squares()[0].parameters(), lr)
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert warnings == ([f"model.params.optimizer prodigy at learning rate {lr:g}: Prodigy finds the step size "
                         "itself and lr ~1.0 is usual (model.base_learning_rate=1.0, without --scale_lr)"]
                        if warns else [])


def snapshot(model: torch.nn.Module) -> list[torch.Tensor]:
    """Copies of the model's parameters."""
    return [p.detach().clone() for p in model.parameters()]


def test_eval_mode_holds_the_schedule_free_eval_weights_for_the_block():
    needs("schedulefree_adamw")
    model, x, y = least_squares()
    optimizer = make_optimizer({"target": "schedulefree_adamw"}, model.parameters(), 5e-2)
    train(model, optimizer, x, y, 10)
    training = snapshot(model)
    assert is_schedule_free(optimizer) and is_schedule_free(LightningOptimizer(optimizer))
    with optimizer_eval_mode([LightningOptimizer(optimizer)]):  # as Lightning hands them out
        assert not optimizer.param_groups[0]["train_mode"]
        assert all(not torch.equal(p, q) for p, q in zip(model.parameters(), training))
    assert optimizer.param_groups[0]["train_mode"]
    assert all(torch.allclose(p, q, rtol=0, atol=1e-6) for p, q in zip(model.parameters(), training))
    train(model, optimizer, x, y, 1)  # still steps after the block

    optimizer.eval()  # one already in eval mode stays so
    with optimizer_eval_mode(optimizer):
        pass
    assert not optimizer.param_groups[0]["train_mode"]


def test_eval_mode_leaves_adamw_alone():
    model, x, y = least_squares()
    optimizer = make_optimizer(None, model.parameters(), 1e-2)
    train(model, optimizer, x, y, 3)
    before = snapshot(model)
    assert not is_schedule_free(optimizer)
    with optimizer_eval_mode([optimizer]):
        assert all(torch.equal(p, q) for p, q in zip(model.parameters(), before))
    assert all(torch.equal(p, q) for p, q in zip(model.parameters(), before))


def state_bytes(optimizer: torch.optim.Optimizer, param: torch.Tensor) -> int:
    """The memory of one parameter's optimizer state."""
    return sum(v.numel() * v.element_size() for v in optimizer.state[param].values() if torch.is_tensor(v))


def test_adamw8bit_keeps_8bit_state_a_third_of_adamws():
    needs("adamw8bit")
    sizes = {}
    for name in ("adamw", "adamw8bit"):
        torch.manual_seed(0)
        layer = torch.nn.Linear(64, 128)  # 8192 weights: above bitsandbytes' min_8bit_size
        optimizer = make_optimizer({"target": name}, layer.parameters(), 1e-3)
        layer(torch.ones(2, 64)).square().mean().backward()
        optimizer.step()
        sizes[name] = state_bytes(optimizer, layer.weight)
    state = optimizer.state[layer.weight]
    assert type(optimizer).__name__ == "AdamW8bit" and state["state1"].dtype == state["state2"].dtype == torch.uint8
    assert sizes["adamw"] >= 2 * 4 * 8192 and sizes["adamw8bit"] < sizes["adamw"] / 3  # two fp32 moments


def test_adafactor_is_torchs():
    optimizer = make_optimizer({"target": "adafactor"}, least_squares()[0].parameters(), 1e-2)
    assert type(optimizer) is torch.optim.Adafactor


def test_a_spec_of_the_new_keys_alone_is_adamw_stepped_per_parameter():
    model, x, y = least_squares()
    optimizer = make_optimizer(OmegaConf.create({"fused_backward": True, "stochastic_rounding": False}),
                               model.parameters(), 5e-2)
    assert isinstance(optimizer, PerParameterOptimizer) and optimizer.fused_backward
    assert not optimizer.stochastic_rounding and optimizer.defaults == adamw(model.parameters(), 5e-2).defaults
    before = mse(model, x, y)
    train(model, optimizer, x, y, 30)
    assert mse(model, x, y) < 0.5 * before
    assert type(make_optimizer({"stochastic_rounding": True}, model.parameters(), 1e-2)) is torch.optim.AdamW  # fp32


@pytest.mark.parametrize("name, reason", [("prodigy", "Prodigy estimates one step size from all parameters"),
                                          ("schedulefree_adamw", "a schedule-free optimizer switches all weights")])
def test_an_optimizer_of_the_whole_model_refuses_to_step_per_parameter(name, reason, caplog):
    needs(name)
    bf16 = torch.nn.Linear(4, 1).bfloat16()
    with pytest.raises(UserError, match=f"optimizer {name}: fused_backward steps each parameter alone during "
                                        f"backward, but {reason}.*; set model.params.optimizer.fused_backward: false"):
        make_optimizer({"target": name, "fused_backward": True}, least_squares()[0].parameters(), 1.0)
    with pytest.raises(UserError, match=f"optimizer {name}: stochastic_rounding steps each bf16 parameter alone, "
                                        f"but {reason}.*; set model.params.optimizer.stochastic_rounding: false"):
        make_optimizer({"target": name, "stochastic_rounding": True}, bf16.parameters(), 1.0)
    with caplog.at_level(logging.WARNING, logger="ldm.optim.factory"):  # by default: rounded to nearest, with a warning
        optimizer = make_optimizer({"target": name}, bf16.parameters(), 1.0)
    assert not isinstance(optimizer, PerParameterOptimizer)
    assert f"optimizer {name}: the bf16 weights are rounded to nearest, not stochastically" in caplog.text
    assert type(make_optimizer({"target": name, "stochastic_rounding": False}, bf16.parameters(), 1.0)) is type(
        optimizer)


def test_no_spec_rounds_bf16_weights_stochastically_too():
    assert isinstance(make_optimizer(None, torch.nn.Linear(4, 1).bfloat16().parameters(), 1e-2), PerParameterOptimizer)
