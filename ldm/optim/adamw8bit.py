"""8-bit AdamW in plain torch, without bitsandbytes: both moments are kept in one byte per element with a float32
scale per block of 256 elements (blockwise quantisation, Dettmers et al. 2022, "8-bit optimizers via block-wise
quantization"), and a parameter's whole update (decode, AdamW step, bf16 stochastic rounding, encode) is one
function, compiled with torch.compile where this machine can (one fused kernel instead of some twenty passes).

The codes are power-companded so that small values keep their precision: the first moment as a signed code c,
m = scale * c|c| / 127^2; the second as the code d of its square root, sqrt(v) = scale * (d / 255)^2. Each block's
scale is its largest magnitude, so that the largest element of a block is exact and decays exactly.

A step sends nothing from the host to the device and reads nothing back: the step count is a tensor on the
parameter's device, the hyper-parameters are a small device tensor (shared by the parameters with the same values)
and the bias corrections are computed from them inside the kernel. The stochastic rounding's random bits are a hash
of the element's index, its weight before the step, the step count and the optimizer's `seed`, never of torch's
global random state: the stream is the same on every DDP rank (they hold the same weights and gradients), the same
for a given seed in every run, and continues exactly after a resume (the step count is in the state)."""
import logging
import math
import warnings
from typing import Any, Callable, Iterable, Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from ldm.optim.per_parameter import LOW_BITS, load_state

logger = logging.getLogger(__name__)

BLOCK = 256  # elements per quantisation block
SIGNED_LEVELS, UNSIGNED_LEVELS = 127.0, 255.0
TINY = 1e-30  # the scale of an all-zero block
GOLDEN, HASH_MULTIPLIERS = -0x61C88647, (0x7FEB352D, -0x7B935975)  # 0x9E3779B9 and 0x846CA68B as int32
STATE_DTYPES = {"step": torch.float32, "exp_avg_codes": torch.int8, "exp_avg_scale": torch.float32,
                "exp_avg_sqrt_codes": torch.uint8, "exp_avg_sqrt_scale": torch.float32}
HYPER_CACHE_SIZE = 16  # hyper-parameter tensors kept per process (a few groups' values on a few devices)

_hyper: dict[tuple, Tensor] = {}  # (device, values) -> those values in a float32 tensor on that device


# The kernel multiplies where it can: a vector division or square root costs several multiplications on a CPU, and
# the update keeps one division and three square roots per element. (The top code still decodes exactly to 1.)
def _decode_signed(codes: Tensor, scale: Tensor) -> Tensor:
    c = codes.float() * (1 / SIGNED_LEVELS)
    return c * c.abs() * scale


def _decode_unsigned(codes: Tensor, scale: Tensor) -> Tensor:
    d = codes.float() * (1 / UNSIGNED_LEVELS)
    return d * d * scale


def _encode(x: Tensor, scale: Tensor, levels: float, dtype: torch.dtype) -> Tensor:
    """The codes of `x` (rows of one block each) at its rows' scales: sign(x) sqrt(|x| / scale), rounded to `levels`."""
    return (x.abs() * (levels * levels / scale)).sqrt().round().copysign(x).to(dtype)


def random_low_bits(x: Tensor, key: Tensor) -> Tensor:
    """16 random bits (int32) per element of the float32 `x`: a hash (Wellons' lowbias32) of the element's index,
    its bits and `key`, which a compiled kernel computes in registers instead of reading a tensor of random numbers.
    Hashing the weight before the step keeps two parameters' bits apart where they share an index, step and seed
    (and, being an input, it is bit for bit the same in the compiled and the eager update)."""
    index = torch.arange(x.numel(), dtype=torch.int32, device=x.device).view(x.shape)
    x = (index * GOLDEN + key) ^ x.view(torch.int32)
    x = (x ^ ((x >> 16) & 0xFFFF)) * HASH_MULTIPLIERS[0]
    x = (x ^ ((x >> 15) & 0x1FFFF)) * HASH_MULTIPLIERS[1]
    return (x ^ ((x >> 16) & 0xFFFF)) & (LOW_BITS - 1)


def update_rows(weight: Tensor, grad: Tensor, m_codes: Tensor, m_scale: Tensor, r_codes: Tensor, r_scale: Tensor,
                hyper: Tensor, step: Tensor, seed: int, rounding: bool) -> None:
    """Step `step` (a float32 count, already advanced) of AdamW, in place, of `weight` (rows of at most one block,
    fp32 or bf16) and its 8-bit moments. `hyper` holds lr, beta1, beta2, eps, weight decay, log beta1 and log beta2
    (the bias corrections 1 - beta^t = -expm1(t log beta) keep their precision in float32); a bf16 weight is rounded
    stochastically with random bits from `seed` and the step when `rounding` (Gupta et al. 2015), to nearest
    otherwise."""
    lr, beta1, beta2, eps, decay, log_beta1, log_beta2 = hyper.unbind()
    step_size = lr / -torch.expm1(step * log_beta1)
    inverse_root_correction2 = torch.rsqrt(-torch.expm1(step * log_beta2))
    g = grad.float()
    m = _decode_signed(m_codes, m_scale) * beta1 + g * (1 - beta1)
    r = _decode_unsigned(r_codes, r_scale)
    v = r * r * beta2 + g * g * (1 - beta2)
    m_scale.copy_(m.abs().amax(dim=1, keepdim=True).clamp_min(TINY))
    r_scale.copy_(v.amax(dim=1, keepdim=True).sqrt().clamp_min(TINY))  # the largest of v: one square root per row
    r = v.sqrt()
    before = weight.float()
    w = before * (1 - lr * decay)
    w = w - step_size * m / (r * inverse_root_correction2 + eps)
    if rounding and weight.dtype == torch.bfloat16:
        key = step.to(torch.int32) * HASH_MULTIPLIERS[0] + seed
        w = (w.view(torch.int32) + random_low_bits(before, key)).bitwise_and(-LOW_BITS).view(torch.float32)
    weight.copy_(w)
    m_codes.copy_(_encode(m, m_scale, SIGNED_LEVELS, torch.int8))
    r_codes.copy_(_encode(r, r_scale, UNSIGNED_LEVELS, torch.uint8))


class CompiledUpdate:
    """update_rows compiled once per process (for any number of rows of a block each), at the first step that asks
    for it; where that fails (native Windows has no Triton, an old Triton, no C++ compiler), it warns once and is
    not tried again in this process: each failed trace costs seconds."""

    def __init__(self):
        self.function: Optional[Callable] = None
        self.error: Optional[str] = None  # why it failed to compile, once it has

    def __call__(self, *args) -> bool:
        """Run the compiled update; False, having changed nothing, where it cannot be compiled."""
        if self.error is not None:
            return False
        if self.function is None:
            self.function = torch.compile(update_rows)
        for tensor in args[:6]:
            torch._dynamo.maybe_mark_dynamic(tensor, 0)
        try:
            self.function(*args)
        except Exception as err:  # noqa: BLE001 - a failure to compile leaves the eager update, which is as correct
            self.error = f"{type(err).__name__}: {err}"
            logger.warning("AdamW8bit: torch.compile failed (%s); stepping without it in this process, which is "
                           "slower", self.error)
            return False
        return True


compiled_update = CompiledUpdate()


def hyper_tensor(group: dict, device: torch.device) -> Tensor:
    """A group's lr, betas, eps, weight decay and log betas in a float32 tensor on `device`, filled there (no copy
    from the host) and shared by every parameter stepped with the same values."""
    beta1, beta2 = group["betas"]
    values = (group["lr"], beta1, beta2, group["eps"], group["weight_decay"],
              *(math.log(b) if b > 0 else -math.inf for b in (beta1, beta2)))
    key = (device, tuple(float(v) for v in values))
    tensor = _hyper.get(key)
    if tensor is None:
        tensor = torch.empty(len(values), dtype=torch.float32, device=device)
        for slot, value in zip(tensor, key[1]):
            slot.fill_(value)
        if len(_hyper) >= HYPER_CACHE_SIZE:
            del _hyper[next(iter(_hyper))]  # the oldest
        _hyper[key] = tensor
    return tensor


class AdamW8bit(torch.optim.Optimizer):
    """AdamW (torch's equations, decoupled weight decay) with 8-bit moments; a bf16 weight is stepped in fp32 and
    rounded stochastically (`stochastic_rounding`). `compile`: fuse each update into one kernel with torch.compile
    (eager when false, or when this machine cannot compile). `seed`: of the rounding's random bits."""

    rounds_bf16 = True  # make_optimizer: this optimizer rounds bf16 weights itself

    def __init__(self, params: Iterable, lr: float = 1e-3, betas: tuple[float, float] = (0.9, 0.999),
                 eps: float = 1e-8, weight_decay: float = 1e-2, stochastic_rounding: bool = True,
                 compile: bool = True, seed: int = 0):
        if lr < 0 or eps < 0 or weight_decay < 0 or not all(0 <= b < 1 for b in betas):
            raise ValueError(f"AdamW8bit: lr {lr}, eps {eps} and weight_decay {weight_decay} must be >= 0, and "
                             f"betas {tuple(betas)} in [0, 1)")
        if not (isinstance(seed, int) and -2 ** 31 <= seed < 2 ** 31):
            raise ValueError(f"AdamW8bit: seed {seed!r} must be an integer in [-2^31, 2^31)")
        super().__init__(params, dict(lr=lr, betas=tuple(betas), eps=eps, weight_decay=weight_decay,
                                      stochastic_rounding=stochastic_rounding, compile=compile, seed=seed))

    @torch.no_grad()
    def step(self, closure: Optional[Callable] = None):
        """Step every parameter that has a gradient; returns the closure's loss."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is not None:
                    self._step_one(p, group)
        return loss

    def _step_one(self, p: Tensor, group: dict) -> None:
        if p.grad.is_sparse:
            raise RuntimeError("AdamW8bit does not take sparse gradients")
        state = self.state[p]
        if not state:
            state.update(self._new_state(p))
        state["step"].add_(1)
        n, rows = p.numel(), -(-p.numel() // BLOCK)
        weight, grad = p.data.view(-1), p.grad.reshape(-1)
        if rows * BLOCK > n:  # the last block is short: step zero-padded copies (at most a few KB: biases, norms)
            weight, grad = (F.pad(t, (0, rows * BLOCK - n)) for t in (weight, grad))
        args = (weight.view(rows, BLOCK), grad.view(rows, BLOCK), state["exp_avg_codes"].view(rows, BLOCK),
                state["exp_avg_scale"].view(rows, 1), state["exp_avg_sqrt_codes"].view(rows, BLOCK),
                state["exp_avg_sqrt_scale"].view(rows, 1), hyper_tensor(group, p.device), state["step"],
                group["seed"], group["stochastic_rounding"])
        if not (group["compile"] and compiled_update(*args)):
            update_rows(*args)
        if weight.numel() > n:
            p.data.view(-1).copy_(weight[:n])

    @staticmethod
    def _new_state(p: Tensor) -> dict:
        """Zero moments: one code byte per element (the last block padded) and one float32 scale per block."""
        blocks = -(-p.numel() // BLOCK)
        n = blocks * BLOCK
        return {"step": torch.zeros((), device=p.device),
                "exp_avg_codes": torch.zeros(n, dtype=torch.int8, device=p.device),
                "exp_avg_scale": torch.full((blocks,), TINY, device=p.device),
                "exp_avg_sqrt_codes": torch.zeros(n, dtype=torch.uint8, device=p.device),
                "exp_avg_sqrt_scale": torch.full((blocks,), TINY, device=p.device)}

    def load_state_dict(self, state_dict: dict) -> None:
        """Load what `state_dict()` saved, each state tensor on its parameter's device in its own dtype (torch's
        load would cast the one-byte codes to the weights' dtype)."""
        load_state(self, state_dict, self.place_state)

    @staticmethod
    def place_state(key: Any, value: Any, param: Tensor) -> Any:
        """A loaded state value on its parameter's device, in the dtype this optimizer keeps it in."""
        if not isinstance(value, Tensor):
            return value
        return value.to(device=param.device, dtype=STATE_DTYPES.get(key, value.dtype))


def adamw8bit_self_check(device: torch.device, elements: int = 1 << 20) -> dict:
    """What a GPU self-check reports about this optimizer on `device`: whether the update compiles (and why not),
    the largest difference between the compiled and the eager update of the same fp32 weights over two steps (beside
    the largest change those steps made), the stochastic rounding's bias (mean of rounded - exact, in units of the
    bf16 spacing, with its standard error; rounding to nearest would give 0.3 here) and, on CUDA, the host syncs
    of one compiled step."""
    rows = -(-elements // BLOCK)
    generator = torch.Generator().manual_seed(0)
    start = torch.randn(rows, BLOCK, generator=generator).to(device)
    grads = [torch.randn(rows, BLOCK, generator=generator).to(device) for _ in range(2)]
    eager = _stepped(start, grads, compile=False)
    compiled = _stepped(start, grads, compile=True)
    difference = None if compiled_update.error else (compiled - eager).abs().max().item()
    # bf16 weights in [1, 2) (spacing 2^-7), each stepped down by 0.3 of a spacing: lr * g / (|g| + eps) ~ lr
    weights = (1 + torch.rand(rows, BLOCK, generator=generator)).bfloat16().to(device)
    positive = [(torch.rand(rows, BLOCK, generator=generator) + 0.5).bfloat16().to(device)]
    lr = 0.3 * 2.0 ** -7
    exact = _stepped(weights.float(), positive, compile=False, lr=lr)
    rounded = _stepped(weights, positive, compile=True, lr=lr).float()  # eager where it failed to compile
    spacing = torch.ldexp(torch.ones_like(exact), torch.frexp(exact).exponent - 8)
    error_units = (rounded - exact) / spacing
    error = compiled_update.error
    return {"device": str(device), "compiled": error is None, "compile_error": error, "max_difference": difference,
            "max_update": (eager - start).abs().max().item(),
            "rounding_bias": error_units.mean().item(),
            "rounding_bias_stderr": error_units.std().item() / error_units.numel() ** 0.5,
            "host_syncs_per_step": _host_syncs(start, grads[0]) if device.type == "cuda" and error is None else None}


def _stepped(start: Tensor, grads: list[Tensor], compile: bool, lr: float = 1e-3) -> Tensor:
    """A copy of `start` after one AdamW8bit step (no weight decay) per gradient."""
    weight = torch.nn.Parameter(start.clone())
    optimizer = AdamW8bit([weight], lr=lr, weight_decay=0.0, compile=compile)
    for grad in grads:
        weight.grad = grad.to(weight.dtype)
        optimizer.step()
    return weight.detach()


def _host_syncs(start: Tensor, grad: Tensor) -> int:
    """The CUDA host syncs of one compiled AdamW8bit step, after a first one that builds the state."""
    weight = torch.nn.Parameter(start.clone())
    weight.grad = grad.clone()
    optimizer = AdamW8bit([weight])
    optimizer.step()
    torch.cuda.synchronize(start.device)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            optimizer.step()
        finally:
            torch.cuda.set_sync_debug_mode("default")
    return sum("synchroniz" in str(w.message) for w in caught)
