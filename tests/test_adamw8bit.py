"""8-bit AdamW in plain torch (adamw8bit_torch): its first step is torch's AdamW, later steps stay close to it, its
state is two bytes per element, bf16 weights are rounded stochastically without bias, and the compiled update is
the eager one."""
import logging

import pytest
import torch

import ldm.adamw8bit as adamw8bit
from ldm.adamw8bit import BLOCK, AdamW8bit, random_low_bits
from ldm.optim import make_optimizer
from ldm.per_param_optim import PerParameterOptimizer

LR = 1e-2


def model(seed: int = 0, dtype: torch.dtype = torch.float32) -> torch.nn.Sequential:
    """Two layers whose weights span many blocks and whose biases end in a short block (300 = 256 + 44)."""
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(64, 300), torch.nn.Tanh(), torch.nn.Linear(300, 1)).to(dtype)


def steps(net: torch.nn.Module, optimizer: torch.optim.Optimizer, count: int) -> list[float]:
    """Full-batch steps on a fixed regression problem; the losses."""
    generator = torch.Generator().manual_seed(1)
    x = torch.randn(128, 64, generator=generator)
    y = x[:, :3].sum(1, keepdim=True).sin()
    dtype = next(net.parameters()).dtype
    losses = []
    for _ in range(count):
        optimizer.zero_grad()
        loss = torch.nn.functional.mse_loss(net(x.to(dtype)).float(), y)
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    return losses


def weights(net: torch.nn.Module) -> list[torch.Tensor]:
    return [p.detach().float().clone() for p in net.parameters()]


def test_the_first_step_is_torch_adamws_and_later_steps_stay_close():
    ours, reference, start = model(), model(), weights(model())
    eight, adamw = AdamW8bit(ours.parameters(), LR, compile=False), torch.optim.AdamW(reference.parameters(), LR)
    steps(ours, eight, 1), steps(reference, adamw, 1)
    for p, q in zip(ours.parameters(), reference.parameters()):  # the first step's moments are not yet quantised
        torch.testing.assert_close(p, q, rtol=1e-6, atol=1e-7)
    ours_losses, reference_losses = steps(ours, eight, 30), steps(reference, adamw, 30)
    for p, q, p0 in zip(ours.parameters(), reference.parameters(), start):
        assert (p - q).abs().max() < 0.1 * (q - p0).abs().max()  # within a tenth of the distance travelled
    assert ours_losses[-1] < 0.05 * ours_losses[0] and ours_losses[-1] < 2 * reference_losses[-1]


def test_the_state_is_one_byte_per_moment_and_element_and_a_scale_per_block():
    net = model()
    optimizer = AdamW8bit(net.parameters(), LR, compile=False)
    steps(net, optimizer, 1)
    state = optimizer.state[net[0].weight]
    assert state["exp_avg_codes"].dtype == torch.int8 and state["exp_avg_sqrt_codes"].dtype == torch.uint8
    assert state["exp_avg_codes"].numel() == net[0].weight.numel() == 19200
    assert state["exp_avg_scale"].shape == state["exp_avg_sqrt_scale"].shape == (19200 // BLOCK,)
    assert optimizer.state[net[0].bias]["exp_avg_scale"].shape == (2,)  # 256 + a block of 44
    size = sum(v.numel() * v.element_size() for v in state.values())
    assert size < 2.05 * 19200  # torch's AdamW: 8 bytes per element


def test_decoding_the_codes_loses_little_of_the_moments():
    x = torch.randn(64, BLOCK) * torch.logspace(-3, 0, 64).unsqueeze(1)  # blocks of every magnitude
    scale = x.abs().amax(1, keepdim=True)
    m = adamw8bit._decode_signed(adamw8bit._encode(x, scale, adamw8bit.SIGNED_LEVELS, torch.int8), scale)
    r = adamw8bit._decode_unsigned(adamw8bit._encode(x.abs(), scale, adamw8bit.UNSIGNED_LEVELS, torch.uint8), scale)
    assert torch.equal(m.abs().amax(1), scale[:, 0]) and torch.equal(r.amax(1), scale[:, 0])  # the largest, exact
    large = x.abs() > 0.1 * scale
    assert ((m - x).abs() / x.abs())[large].max() < 0.026 and ((r - x.abs()) / x.abs())[large].max() < 0.013
    error, small = (m - x).abs() / scale, x.abs() < 0.01 * scale  # small values keep a finer step
    assert error.max() < 1.001 / adamw8bit.SIGNED_LEVELS and error[small].max() < 0.001


def test_random_low_bits_are_uniform_16_bit_values():
    bits = random_low_bits(torch.empty(1 << 20), torch.tensor(12345, dtype=torch.int32))
    assert bits.dtype == torch.int32 and bits.min() >= 0 and bits.max() < 1 << 16
    counts = torch.bincount(bits >> 8, minlength=256).float()  # the top 8 of the 16 bits, 4096 expected each
    assert ((counts - 4096).square() / 4096).sum() < 330  # chi-square, 255 degrees of freedom: p ~ 0.001
    assert abs((bits & 1).float().mean() - 0.5) < 0.005
    other = random_low_bits(torch.empty(1 << 20), torch.tensor(12346, dtype=torch.int32))
    assert (bits == other).float().mean() < 0.001


@pytest.mark.parametrize("rounding", [True, False])
def test_a_bf16_weight_is_rounded_without_bias_or_to_nearest(rounding):
    """A step of 0.3 of the spacing of bf16 below 1.0 moves 30 % of the weights one spacing down, on average."""
    spacing = 2.0 ** -8
    weight = torch.nn.Parameter(torch.ones(64, BLOCK, dtype=torch.bfloat16))
    optimizer = AdamW8bit([weight], lr=0.3 * spacing, weight_decay=0.0, stochastic_rounding=rounding, compile=False)
    weight.grad = torch.ones_like(weight)
    optimizer.step()
    assert weight.dtype == torch.bfloat16 and set(weight.float().unique().tolist()) <= {1.0, 1.0 - spacing}
    moved = (weight.float() < 1.0).float().mean().item()
    assert abs(moved - 0.3) < 0.02 if rounding else moved == 0.0


def test_the_compiled_update_is_the_eager_one():
    for dtype in (torch.float32, torch.bfloat16):
        eager, compiled = model(dtype=dtype), model(dtype=dtype)
        optimizers = AdamW8bit(eager.parameters(), LR, compile=False), AdamW8bit(compiled.parameters(), LR)
        for net, optimizer in zip((eager, compiled), optimizers):
            torch.manual_seed(3)  # the same rounding seeds
            steps(net, optimizer, 3)
        assert optimizers[1].param_groups[0]["compile"]  # it did compile
        for p, q in zip(eager.parameters(), compiled.parameters()):
            same = torch.isclose(p.float(), q.float(), rtol=1e-5, atol=1e-7).float().mean()
            assert same > 0.999, (dtype, same)  # bf16: a rare weight may round the other way


def test_a_failed_compile_warns_and_steps_eagerly(monkeypatch, caplog):
    def fail(*args):
        raise RuntimeError("no C++ compiler")

    monkeypatch.setattr(adamw8bit, "_compiled", [fail])
    net, reference = model(), model()
    optimizer = AdamW8bit(net.parameters(), LR)
    with caplog.at_level(logging.WARNING, logger="ldm.adamw8bit"):
        steps(net, optimizer, 2)
    assert "torch.compile failed (RuntimeError: no C++ compiler); stepping without it" in caplog.text
    assert not optimizer.param_groups[0]["compile"]
    steps(reference, AdamW8bit(reference.parameters(), LR, compile=False), 2)
    assert all(torch.equal(p, q) for p, q in zip(net.parameters(), reference.parameters()))


def test_make_optimizer_lets_it_round_bf16_weights_itself_even_in_fused_backward():
    net = model(dtype=torch.bfloat16)
    plain = make_optimizer({"target": "adamw8bit_torch"}, net.parameters(), LR)
    assert type(plain) is AdamW8bit and plain.defaults["stochastic_rounding"]  # no per-parameter fp32 copy
    nearest = make_optimizer({"target": "adamw8bit_torch", "stochastic_rounding": False}, net.parameters(), LR)
    assert not nearest.defaults["stochastic_rounding"]
    fused = make_optimizer({"target": "adamw8bit_torch", "fused_backward": True}, net.parameters(), LR)
    assert isinstance(fused, PerParameterOptimizer) and not fused.stochastic_rounding  # the inner one rounds
    before = steps(net, fused, 8)
    assert all(p.grad is None and p.dtype == torch.bfloat16 for p in net.parameters())
    assert before[-1] < 0.5 * before[0]
    assert fused.state[net[0].weight]["exp_avg_codes"].dtype == torch.int8
    assert fused._inner[net[0].weight].param_groups[0]["compile"]  # compiled inside the gradient hooks
