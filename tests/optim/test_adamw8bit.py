"""8-bit AdamW in plain torch (adamw8bit_torch): its first step is torch's AdamW, later steps stay close to it, its
state is two bytes per element, bf16 weights are rounded stochastically without bias, and the compiled update is
the eager one."""
import io
import logging
from functools import partial

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

import ldm.optim.adamw8bit as adamw8bit
from ldm.optim.adamw8bit import BLOCK, STATE_DTYPES, AdamW8bit, adamw8bit_self_check, random_low_bits
from ldm.optim.factory import make_optimizer
from ldm.optim.per_parameter import PerParameterOptimizer

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
    bits = random_low_bits(torch.zeros(1 << 20), torch.tensor(12345, dtype=torch.int32))
    assert bits.dtype == torch.int32 and bits.min() >= 0 and bits.max() < 1 << 16
    counts = torch.bincount(bits >> 8, minlength=256).float()  # the top 8 of the 16 bits, 4096 expected each
    assert ((counts - 4096).square() / 4096).sum() < 330  # chi-square, 255 degrees of freedom: p ~ 0.001
    assert abs((bits & 1).float().mean() - 0.5) < 0.005
    other = random_low_bits(torch.zeros(1 << 20), torch.tensor(12346, dtype=torch.int32))
    assert (bits == other).float().mean() < 0.001
    other = random_low_bits(torch.ones(1 << 20), torch.tensor(12345, dtype=torch.int32))  # another weight
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
    """On the same gradients (a bf16 forward would amplify the rare weight that rounds the other way)."""
    for dtype in (torch.float32, torch.bfloat16):
        eager, compiled = model(dtype=dtype), model(dtype=dtype)
        optimizers = AdamW8bit(eager.parameters(), LR, compile=False), AdamW8bit(compiled.parameters(), LR)
        for _ in range(3):
            steps(eager, optimizers[0], 1)
            for p, q in zip(eager.parameters(), compiled.parameters()):
                q.grad = p.grad.clone()
            optimizers[1].step()
        assert adamw8bit.compiled_update.function is not None and adamw8bit.compiled_update.error is None
        for p, q in zip(eager.parameters(), compiled.parameters()):
            same = torch.isclose(p.float(), q.float(), rtol=1e-5, atol=1e-7).float().mean()
            assert same > 0.999, (dtype, same)  # bf16: a rare weight may round the other way


def failing_compile(monkeypatch) -> list:
    """torch.compile made to fail at each call of the function it returns, in a fresh CompiledUpdate; the calls."""
    attempts = []

    def compile(function):
        def fail(*args):
            attempts.append(args)
            raise RuntimeError("no C++ compiler")
        return fail

    monkeypatch.setattr(adamw8bit, "compiled_update", adamw8bit.CompiledUpdate())
    monkeypatch.setattr(torch, "compile", compile)
    return attempts


@pytest.mark.parametrize("spec", [{"target": "adamw8bit_torch"}, {"target": "adamw8bit_torch", "fused_backward": True}],
                         ids=["plain", "per_parameter"])
def test_a_failed_compile_is_tried_once_per_process_and_warns_once(monkeypatch, caplog, spec):
    attempts = failing_compile(monkeypatch)
    net, reference = model(), model()
    optimizer = make_optimizer(spec, net.parameters(), LR)  # PerParameterOptimizer copies compile: true each step
    with caplog.at_level(logging.WARNING, logger="ldm.optim.adamw8bit"):
        steps(net, optimizer, 3)  # 3 steps of 4 parameters
        other = model()
        steps(other, make_optimizer(spec, other.parameters(), LR), 1)  # another optimizer in this process
    assert len(attempts) == 1
    assert caplog.text.count("torch.compile failed (RuntimeError: no C++ compiler); stepping without it") == 1
    steps(reference, make_optimizer({**spec, "params": {"compile": False}}, reference.parameters(), LR), 3)
    assert all(torch.equal(p, q) for p, q in zip(net.parameters(), reference.parameters()))


def test_a_failed_compile_warns_and_steps_eagerly(monkeypatch, caplog):
    failing_compile(monkeypatch)
    net, reference = model(), model()
    optimizer = AdamW8bit(net.parameters(), LR)
    with caplog.at_level(logging.WARNING, logger="ldm.optim.adamw8bit"):
        steps(net, optimizer, 2)
    assert "torch.compile failed (RuntimeError: no C++ compiler); stepping without it" in caplog.text
    assert adamw8bit.compiled_update.error == "RuntimeError: no C++ compiler"
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
    assert adamw8bit.compiled_update.function is not None  # compiled inside the gradient hooks
    assert adamw8bit.compiled_update.error is None


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("fused_backward", [False, True], ids=["plain", "per_parameter"])
def test_a_resume_keeps_the_state_dtypes_and_continues_exactly(dtype, fused_backward):
    """The codes stay one byte (torch's load_state_dict would cast them to the weights' dtype); the rounding stream
    continues as in the uninterrupted run, whatever torch's global random state."""
    spec = {"target": "adamw8bit_torch", "fused_backward": fused_backward, "params": {"compile": False}}
    net = model(dtype=dtype)
    optimizer = make_optimizer(spec, net.parameters(), LR)
    steps(net, optimizer, 2)
    buffer, at = io.BytesIO(), [p.detach().clone() for p in net.parameters()]
    torch.save(optimizer.state_dict(), buffer)
    steps(net, optimizer, 2)
    again = model(dtype=dtype)
    with torch.no_grad():
        for p, saved in zip(again.parameters(), at):
            p.copy_(saved)
    loaded = make_optimizer(spec, again.parameters(), LR)
    buffer.seek(0)
    loaded.load_state_dict(torch.load(buffer, weights_only=True))
    for p in again.parameters():
        assert {key: value.dtype for key, value in loaded.state[p].items()} == STATE_DTYPES
    torch.manual_seed(123)  # another global random state than the first run's
    steps(again, loaded, 2)
    assert all(torch.equal(p, q) for p, q in zip(net.parameters(), again.parameters()))


@pytest.mark.parametrize("fused_backward", [False, True], ids=["plain", "per_parameter"])
def test_a_loaded_state_lies_on_the_parameters_device_step_count_included(fused_backward):
    """The step count too (torch and PerParameterOptimizer leave a 'step' on the CPU): a step reads it there."""
    spec = {"target": "adamw8bit_torch", "fused_backward": fused_backward, "params": {"compile": False}}
    net = model()
    optimizer = make_optimizer(spec, net.parameters(), LR)
    steps(net, optimizer, 1)
    elsewhere = model().to("meta")  # another device than the saved state's
    loaded = make_optimizer(spec, elsewhere.parameters(), LR)
    loaded.load_state_dict(optimizer.state_dict())
    assert {v.device.type for p in elsewhere.parameters() for v in loaded.state[p].values()} == {"meta"}


def test_a_state_that_a_cast_widened_gets_its_dtypes_back():
    """A last.ckpt written after a resume before this fix holds the codes in the weights' dtype."""
    net = model(dtype=torch.bfloat16)
    optimizer = AdamW8bit(net.parameters(), LR, compile=False)
    steps(net, optimizer, 1)
    state = optimizer.state_dict()
    widened = {**state, "state": {i: {k: v.bfloat16() if "codes" in k else v for k, v in s.items()}
                                  for i, s in state["state"].items()}}
    optimizer.load_state_dict(widened)
    assert all(s["exp_avg_codes"].dtype == torch.int8 and s["exp_avg_sqrt_codes"].dtype == torch.uint8
               for s in optimizer.state.values())
    assert all(torch.equal(optimizer.state[p]["exp_avg_codes"], s["exp_avg_codes"])
               for p, s in zip(net.parameters(), state["state"].values()))


class HostOps(TorchDispatchMode):
    """Records the aten ops run under it by name."""

    def __init__(self):
        super().__init__()
        self.names: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.names.append(func.__name__)
        return func(*args, **(kwargs or {}))


# torch.tensor / as_tensor from Python data, .item() and .tolist(), random numbers, copies between devices
FROM_OR_TO_HOST = ("lift_fresh", "_local_scalar_dense", "rand", "random_", "uniform_", "normal_", "bernoulli",
                   "_copy_from")


@pytest.mark.parametrize("per_parameter", [False, True], ids=["plain", "per_parameter"])
def test_a_step_builds_no_tensor_from_host_data_and_leaves_the_global_rng_alone(per_parameter, monkeypatch):
    monkeypatch.setattr(adamw8bit, "_hyper", {})  # no hyper-parameter tensors from other tests
    net = model(dtype=torch.bfloat16)
    build = partial(AdamW8bit, lr=LR, compile=False)
    optimizer = PerParameterOptimizer(net.parameters(), build, stochastic_rounding=False) if per_parameter \
        else build(net.parameters())
    for p in net.parameters():
        p.grad = torch.randn(p.shape, generator=torch.Generator().manual_seed(p.numel())).bfloat16()
    optimizer.step()  # builds the state
    rng = torch.get_rng_state()
    with HostOps() as steady:
        optimizer.step()
    optimizer.param_groups[0]["lr"] = LR * 0.731
    with HostOps() as scheduled:
        optimizer.step()
    for ops in (steady.names, scheduled.names):
        assert not [name for name in ops if name.startswith(FROM_OR_TO_HOST)]
    assert torch.equal(torch.get_rng_state(), rng)
    assert steady.names.count("fill_.Scalar") == 0  # the hyper-parameters stay on the device
    assert scheduled.names.count("fill_.Scalar") == 7  # a new lr: one tensor for all 4 parameters, filled there


@pytest.mark.parametrize("compile", [False, True], ids=["eager", "compiled"])
def test_a_cuda_step_does_not_sync_with_the_host(compile):
    if not torch.cuda.is_available():
        pytest.skip("no CUDA device: host syncs are counted on a GPU only (the CPU test above checks host data)")
    device = torch.device("cuda", torch.cuda.current_device())
    for dtype in (torch.float32, torch.bfloat16):
        net = model(dtype=dtype).to(device)
        optimizer = AdamW8bit(net.parameters(), LR, compile=compile)
        for p in net.parameters():
            p.grad = torch.randn_like(p)
        optimizer.step()  # builds the state (and compiles)
        torch.cuda.synchronize(device)
        torch.cuda.set_sync_debug_mode("error")
        try:
            optimizer.step()
            optimizer.param_groups[0]["lr"] = LR * 0.5
            optimizer.step()
        finally:
            torch.cuda.set_sync_debug_mode("default")


def test_the_self_check_reports_parity_unbiased_rounding_and_that_it_compiled(monkeypatch):
    monkeypatch.setattr(adamw8bit, "compiled_update", adamw8bit.CompiledUpdate())
    monkeypatch.setattr(torch, "compile", lambda function: function)  # compiling takes a minute on a CPU
    report = adamw8bit_self_check(torch.device("cpu"), elements=1 << 16)
    assert report["compiled"] and report["compile_error"] is None and report["max_difference"] == 0.0
    assert report["max_update"] > 1e-3 and report["host_syncs_per_step"] is None
    assert 0 < report["rounding_bias_stderr"] < 0.002
    assert abs(report["rounding_bias"]) < 4 * report["rounding_bias_stderr"]
    monkeypatch.setattr(adamw8bit, "random_low_bits", lambda x, key: torch.zeros_like(x, dtype=torch.int32))
    truncated = adamw8bit_self_check(torch.device("cpu"), elements=1 << 16)  # rounds toward zero: 0.7 spacing down
    assert truncated["rounding_bias"] == pytest.approx(-0.7, abs=0.01)


def test_the_self_check_reports_a_failed_compile(monkeypatch):
    failing_compile(monkeypatch)
    report = adamw8bit_self_check(torch.device("cpu"), elements=1 << 12)
    assert not report["compiled"] and report["compile_error"] == "RuntimeError: no C++ compiler"
    assert report["max_difference"] is None and abs(report["rounding_bias"]) < 0.05
