"""The per-parameter optimizer: fused backward, stochastic rounding of bf16 weights, and its state under Lightning."""
import copy
import io
from functools import partial

import pytest
import pytorch_lightning as pl
import torch
import torch.utils.checkpoint
from lightning_fabric.utilities.optimizer import _optimizer_to_device
from pytorch_lightning.core.optimizer import LightningOptimizer

from ldm.optim.factory import adamw, make_optimizer, uses_fused_backward
from ldm.optim.per_parameter import PerParameterOptimizer, stochastic_round_to_bf16
from ldm.util import UserError

LR, HEAD_LR = 1e-2, 3e-2


def schedule(step: int) -> float:
    """LambdaLR's factor: it decays, so that a stale learning rate shows."""
    return 1.0 / (1.0 + step)


def mlp(seed: int = 0, dtype: torch.dtype = torch.float32) -> torch.nn.Sequential:
    """A two-layer network."""
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Tanh(), torch.nn.Linear(8, 1)).to(dtype)


def groups(model: torch.nn.Sequential) -> list[dict]:
    """Two groups as the trainer makes them: the body at the base lr, the head at its own lr and weight decay."""
    return [{"params": list(model[0].parameters())},
            {"params": list(model[2].parameters()), "lr": HEAD_LR, "weight_decay": 0.1}]


def batch(step: int, dtype: torch.dtype = torch.float32) -> tuple[torch.Tensor, torch.Tensor]:
    """A different regression batch at each step."""
    generator = torch.Generator().manual_seed(step)
    x = torch.randn(16, 4, generator=generator)
    return x.to(dtype), x.sum(1, keepdim=True).sin().to(dtype)


def closure_for(model: torch.nn.Module, optimizer: torch.optim.Optimizer, step: int, grads: list):
    """What Lightning passes to step(): zero the grads, forward, backward; records which grads survive backward."""
    def closure() -> torch.Tensor:
        optimizer.zero_grad()
        x, y = batch(step, next(model.parameters()).dtype)
        loss = torch.nn.functional.mse_loss(model(x), y)
        loss.backward()
        grads.append([p.grad is not None for p in model.parameters()])
        return loss
    return closure


def run(model: torch.nn.Module, optimizer: torch.optim.Optimizer, steps: range, scheduler=None) -> list:
    """Lightning-style steps (under no_grad, as nothing promises grad mode); the grads left after each backward."""
    grads = []
    for step in steps:
        with torch.no_grad():
            loss = optimizer.step(closure_for(model, optimizer, step, grads))
        assert loss.requires_grad and loss.item() > 0  # step() returns the closure's loss
        if scheduler is not None:
            scheduler.step()
    return grads


def weights(model: torch.nn.Module) -> list[torch.Tensor]:
    """Copies of the model's parameters."""
    return [p.detach().clone() for p in model.parameters()]


@pytest.mark.parametrize("fused_backward", [True, False], ids=["fused_backward", "step_after_backward"])
def test_it_steps_as_torch_adamw_with_two_groups_and_a_schedule(fused_backward):
    model, reference = mlp(), mlp()
    optimizer = PerParameterOptimizer(groups(model), partial(adamw, lr=LR), fused_backward=fused_backward)
    expected = torch.optim.AdamW(groups(reference), lr=LR)
    schedules = [torch.optim.lr_scheduler.LambdaLR(opt, schedule) for opt in (optimizer, expected)]
    grads = run(model, optimizer, range(6), schedules[0])
    run(reference, expected, range(6), schedules[1])
    assert [g["lr"] for g in optimizer.param_groups] == [g["lr"] for g in expected.param_groups]
    assert [g["lr"] for g in optimizer.param_groups] == pytest.approx([LR / 7, HEAD_LR / 7])
    assert all(torch.allclose(p, q, rtol=0, atol=1e-6) for p, q in zip(model.parameters(), reference.parameters()))
    assert not torch.equal(model[0].weight, mlp()[0].weight)
    assert grads == [[not fused_backward] * 4] * 6  # fused: no parameter holds a gradient after backward


def test_in_fused_backward_backward_alone_steps_and_zero_grad_is_harmless():
    model, reference = mlp(), mlp()
    optimizer = make_optimizer({"fused_backward": True}, model.parameters(), LR)
    expected = torch.optim.AdamW(reference.parameters(), lr=LR)
    assert isinstance(optimizer, PerParameterOptimizer) and uses_fused_backward(optimizer)
    for step in range(3):
        for net, opt in ((model, optimizer), (reference, expected)):
            x, y = batch(step)
            torch.nn.functional.mse_loss(net(x), y).backward()
            opt.step()
            opt.zero_grad()
    assert all(torch.allclose(p, q, rtol=0, atol=1e-6) for p, q in zip(model.parameters(), reference.parameters()))


def test_fused_backward_steps_once_through_activation_checkpointing():
    model, reference = mlp(), mlp()
    optimizer = make_optimizer({"fused_backward": True}, model.parameters(), LR)
    expected = torch.optim.AdamW(reference.parameters(), lr=LR)
    for step in range(3):
        for net, opt in ((model, optimizer), (reference, expected)):
            x, y = batch(step)
            out = torch.utils.checkpoint.checkpoint(net, x, use_reentrant=False)  # as the UNet's blocks do
            torch.nn.functional.mse_loss(out, y).backward()
            opt.step()
            opt.zero_grad()
    assert all(torch.allclose(p, q, rtol=0, atol=1e-6) for p, q in zip(model.parameters(), reference.parameters()))


def test_only_the_newest_fused_optimizer_steps_a_parameter_and_its_hooks_can_be_removed():
    model, reference = mlp(), mlp()
    PerParameterOptimizer(model.parameters(), partial(adamw, lr=LR), fused_backward=True)  # superseded at once
    optimizer = PerParameterOptimizer(model.parameters(), partial(adamw, lr=LR), fused_backward=True)
    expected = torch.optim.AdamW(reference.parameters(), lr=LR)
    run(model, optimizer, range(2))
    run(reference, expected, range(2))
    assert all(torch.allclose(p, q, rtol=0, atol=1e-6) for p, q in zip(model.parameters(), reference.parameters()))

    optimizer.remove_hooks()
    before = weights(model)
    grads = run(model, optimizer, range(2, 3))
    assert grads == [[True] * 4] and all(torch.equal(p, q) for p, q in zip(model.parameters(), before))


def resumed(state: dict, at: list[torch.Tensor], generator_state: torch.Tensor, dtype: torch.dtype,
            fused_backward: bool) -> tuple[torch.nn.Module, PerParameterOptimizer]:
    """A new model at the saved weights, with a new optimizer that loaded the saved state."""
    model = mlp(seed=1, dtype=dtype)
    with torch.no_grad():
        for p, saved in zip(model.parameters(), at):
            p.copy_(saved)
    generator = torch.Generator().set_state(generator_state)
    optimizer = PerParameterOptimizer(groups(model), partial(adamw, lr=LR), fused_backward=fused_backward,
                                      generator=generator)
    optimizer.load_state_dict(state)
    return model, optimizer


@pytest.mark.parametrize("dtype, fused_backward", [(torch.float32, True), (torch.float32, False),
                                                   (torch.bfloat16, True)], ids=["fp32-fused", "fp32", "bf16-sr"])
@pytest.mark.parametrize("through_file", [False, True], ids=["in_memory", "torch_save"])
def test_a_loaded_state_dict_continues_exactly_as_the_uninterrupted_run(dtype, fused_backward, through_file):
    model = mlp(dtype=dtype)
    generator = torch.Generator().manual_seed(0)
    optimizer = PerParameterOptimizer(groups(model), partial(adamw, lr=LR), fused_backward=fused_backward,
                                      generator=generator)
    run(model, optimizer, range(3))
    optimizer.param_groups[1]["lr"] = HEAD_LR / 2  # a scheduled lr is part of the state
    state, at, generator_state = copy.deepcopy(optimizer.state_dict()), weights(model), generator.get_state()
    if through_file:
        buffer = io.BytesIO()
        torch.save(state, buffer)
        buffer.seek(0)
        state = torch.load(buffer, weights_only=True)
    run(model, optimizer, range(3, 6))

    again, loaded = resumed(state, at, generator_state, dtype, fused_backward)
    assert loaded.param_groups[1]["lr"] == HEAD_LR / 2
    assert loaded.state[again[0].weight]["exp_avg"].dtype == torch.float32  # a bf16 weight's state stays fp32
    run(again, loaded, range(3, 6))
    assert all(torch.equal(p, q) for p, q in zip(model.parameters(), again.parameters()))
    assert all(p.dtype == dtype for p in again.parameters())


def test_a_state_dict_of_other_groups_is_a_clear_error():
    model = mlp()
    state = PerParameterOptimizer(model.parameters(), partial(adamw, lr=LR)).state_dict()
    with pytest.raises(UserError, match=r"parameter groups of \[4\] parameters but this optimizer has \[2, 2\]"):
        PerParameterOptimizer(groups(mlp()), partial(adamw, lr=LR)).load_state_dict(state)


def test_only_trainable_parameters_get_state_and_pop_drops_one():
    model = mlp()
    model[2].requires_grad_(False)  # a frozen part, still in its group
    optimizer = make_optimizer({"fused_backward": True}, groups(model), LR)
    run(model, optimizer, range(2))
    body, head = list(model[0].parameters()), list(model[2].parameters())
    assert set(map(id, optimizer.state)) == set(map(id, body)) and len(optimizer.state) == 2
    assert all(p not in optimizer.state for p in head)

    dropped = optimizer.state.pop(body[1])
    assert int(dropped["step"]) == 2 and body[1] not in optimizer.state
    assert optimizer.state.pop(body[1], None) is None and optimizer.state.pop(head[0], None) is None
    assert sorted(optimizer.state_dict()["state"]) == [0]
    run(model, optimizer, range(2, 3))
    assert int(optimizer.state[body[1]]["step"]) == 1  # starts afresh, as torch's optimizers do


def test_lightning_moves_the_state_of_the_inner_optimizers():
    model = mlp()
    optimizer = make_optimizer({"fused_backward": True}, model.parameters(), LR)
    run(model, optimizer, range(1))
    _optimizer_to_device(optimizer, torch.device("meta"))  # as Lightning does on setup and after a resume
    assert all(optimizer.state[p]["exp_avg"].is_meta for p in model.parameters())
    assert all(state["exp_avg_sq"].is_meta for state in optimizer.state_dict()["state"].values())
    optimizer.state[model[0].bias] = {"step": torch.tensor(7.0)}
    assert optimizer.state[model[0].bias]["step"] == 7
    with pytest.raises(KeyError, match="not a parameter of this optimizer"):
        optimizer.state[torch.nn.Parameter(torch.zeros(1))] = {}


class Regression(pl.LightningModule):
    """The two-layer network as a LightningModule with a fused-backward AdamW and a LambdaLR schedule."""

    def __init__(self):
        super().__init__()
        self.net = mlp()

    def training_step(self, batch: tuple, batch_idx: int) -> torch.Tensor:
        x, y = batch
        return torch.nn.functional.mse_loss(self.net(x), y)

    def configure_optimizers(self):
        optimizer = make_optimizer({"fused_backward": True}, groups(self.net), LR)
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, schedule)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}


def fit(max_steps: int, resume_from=None, save_to=None) -> tuple[pl.Trainer, Regression]:
    """Lightning steps on fixed batches (3 to an epoch), resumed from a checkpoint or saving one every 3 steps."""
    data = torch.utils.data.DataLoader([batch(step) for step in range(3)], batch_size=None)
    callbacks = [pl.callbacks.ModelCheckpoint(dirpath=save_to, every_n_train_steps=3, save_top_k=-1)] if save_to else []
    module, trainer = Regression(), pl.Trainer(
        max_steps=max_steps, accelerator="cpu", logger=False, callbacks=callbacks, enable_checkpointing=bool(save_to),
        enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0)
    trainer.fit(module, data, ckpt_path=resume_from)
    return trainer, module


@pytest.mark.filterwarnings("ignore:Be aware that when using `ckpt_path`")  # the resumed run saves no checkpoints
def test_lightning_trains_saves_and_resumes_it_exactly(tmp_path):
    trainer, straight = fit(6, save_to=tmp_path)
    assert uses_fused_backward(trainer.optimizers[0]) and uses_fused_backward(LightningOptimizer(trainer.optimizers[0]))
    assert trainer.optimizers[0].param_groups[1]["lr"] == pytest.approx(HEAD_LR / 7)
    _, resumed_module = fit(6, resume_from=tmp_path / "epoch=0-step=3.ckpt")  # as from last.ckpt at step 3
    assert all(torch.equal(p, q) for p, q in zip(straight.parameters(), resumed_module.parameters()))
    assert not torch.equal(straight.net[0].weight, mlp()[0].weight)


def test_stochastic_rounding_is_unbiased_between_two_bf16_neighbours():
    low, high = 1.0, 1.0 + 2 ** -7  # neighbours in bfloat16
    for sign in (1.0, -1.0):
        value = sign * (low + 0.3 * (high - low))
        x = torch.full((200_000,), value)
        rounded = stochastic_round_to_bf16(x, torch.Generator().manual_seed(0))
        assert rounded.dtype == torch.bfloat16 and set(rounded.abs().float().unique().tolist()) == {low, high}
        # each rounding has a std of 2^-7 * sqrt(0.3 * 0.7) = 3.6e-3; the mean of 200k of them 8e-6
        assert rounded.float().mean().item() == pytest.approx(value, abs=5e-5)
        assert x.bfloat16().float().mean().item() == sign * low  # round-to-nearest is off by 0.3 of the spacing


def test_stochastic_rounding_leaves_representable_values_alone():
    exact = torch.randn(10_000, generator=torch.Generator().manual_seed(0)).bfloat16()
    exact = torch.cat([exact, torch.tensor([0.0, -0.0, float("inf"), -float("inf"), 3.3895e38]).bfloat16()])
    assert torch.equal(stochastic_round_to_bf16(exact.float()), exact)
    # NaNs whose low bits would carry into the exponent (to inf) or past the sign bit (to -0) stay NaN
    nans = torch.tensor([0x7F800001, 0x7FFFFFFF, -1, 0x7FC00000], dtype=torch.int32).view(torch.float32)
    assert stochastic_round_to_bf16(nans.repeat(100)).isnan().all()


def tiny_steps(spec: dict, steps: int = 200) -> torch.Tensor:
    """A bf16 weight of ones after `steps` SGD steps of 1e-4 each, far below half its bf16 spacing (2^-9)."""
    weight = torch.nn.Parameter(torch.ones(2000, dtype=torch.bfloat16))
    optimizer = make_optimizer(spec, [weight], 1e-4)
    for _ in range(steps):
        weight.grad = torch.ones_like(weight)
        optimizer.step()
    return weight.detach()


def test_stochastic_rounding_lets_tiny_steps_add_up_as_in_fp32():
    torch.manual_seed(0)
    moved = tiny_steps({"target": "torch.optim.SGD"})  # stochastic_rounding by default
    assert moved.dtype == torch.bfloat16
    # fp32 reference: 1 - 200 * 1e-4 = 0.98; the mean of 2000 weights has a std of about 2e-4
    assert moved.float().mean().item() == pytest.approx(0.98, abs=1e-3)
    nearest = tiny_steps({"target": "torch.optim.SGD", "stochastic_rounding": False})
    assert torch.equal(nearest, torch.ones(2000, dtype=torch.bfloat16))  # each step rounds back to 1


def test_stochastic_rounding_alone_wraps_only_for_bf16_parameters():
    spec = {"target": "torch.optim.SGD"}
    assert type(make_optimizer(spec, mlp().parameters(), LR)) is torch.optim.SGD
    model = mlp(dtype=torch.bfloat16)
    optimizer = make_optimizer(spec, model.parameters(), LR)
    assert isinstance(optimizer, PerParameterOptimizer) and not uses_fused_backward(optimizer)
    model.requires_grad_(False)
    assert type(make_optimizer(spec, model.parameters(), LR)) is torch.optim.SGD  # no trainable bf16 parameter
    assert not uses_fused_backward(torch.optim.SGD(mlp().parameters(), LR))


def test_adamw8bit_steps_a_bf16_weight_in_fused_backward_with_8bit_state():
    pytest.importorskip("bitsandbytes", reason="bitsandbytes is not installed (pip install bitsandbytes)")
    torch.manual_seed(0)
    layer = torch.nn.Linear(64, 128).bfloat16()  # 8192 weights: above bitsandbytes' min_8bit_size
    optimizer = make_optimizer({"target": "adamw8bit", "fused_backward": True}, layer.parameters(), 1e-2)
    x = torch.randn(32, 64, generator=torch.Generator().manual_seed(0)).bfloat16()
    losses = []
    for _ in range(5):
        loss = layer(x).float().square().mean()
        loss.backward()
        losses.append(loss.item())
        assert layer.weight.grad is None
    assert isinstance(optimizer, PerParameterOptimizer) and losses[-1] < 0.8 * losses[0]
    assert layer.weight.dtype == torch.bfloat16
    state = optimizer.state[layer.weight]
    assert state["state1"].dtype == state["state2"].dtype == torch.uint8
