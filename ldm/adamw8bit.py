"""8-bit AdamW in plain torch, without bitsandbytes: both moments are kept in one byte per element with a float32
scale per block of 256 elements (blockwise quantisation, Dettmers et al. 2022, "8-bit optimizers via block-wise
quantization"), and a parameter's whole update (decode, AdamW step, bf16 stochastic rounding, encode) is one
function, compiled with torch.compile where this machine can (one fused kernel instead of some twenty passes).

The codes are power-companded so that small values keep their precision: the first moment as a signed code c,
m = scale * c|c| / 127^2; the second as the code d of its square root, sqrt(v) = scale * (d / 255)^2. Each block's
scale is its largest magnitude, so that the largest element of a block is exact and decays exactly."""
import logging
from typing import Callable, Iterable, Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from ldm.per_param_optim import LOW_BITS

logger = logging.getLogger(__name__)

BLOCK = 256  # elements per quantisation block
SIGNED_LEVELS, UNSIGNED_LEVELS = 127.0, 255.0
TINY = 1e-30  # the scale of an all-zero block
GOLDEN, HASH_MULTIPLIERS = -0x61C88647, (0x7FEB352D, -0x7B935975)  # 0x9E3779B9 and 0x846CA68B as int32

_compiled: list[Callable] = []  # update_rows compiled, once per process, at the first step that asks for it


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


def random_low_bits(like: Tensor, seed: Tensor) -> Tensor:
    """16 random bits (int32) per element of `like`: a hash of the element's index and `seed` (Wellons' lowbias32),
    which a compiled kernel computes in registers instead of reading a tensor of random numbers."""
    x = torch.arange(like.numel(), dtype=torch.int32, device=like.device).view(like.shape) * GOLDEN + seed
    x = (x ^ ((x >> 16) & 0xFFFF)) * HASH_MULTIPLIERS[0]
    x = (x ^ ((x >> 15) & 0x1FFFF)) * HASH_MULTIPLIERS[1]
    return (x ^ ((x >> 16) & 0xFFFF)) & (LOW_BITS - 1)


def update_rows(weight: Tensor, grad: Tensor, m_codes: Tensor, m_scale: Tensor, r_codes: Tensor, r_scale: Tensor,
                hyper: Tensor, seed: Tensor, rounding: bool) -> None:
    """One AdamW step, in place, of `weight` (rows of at most one block, fp32 or bf16) and its 8-bit moments.
    `hyper` holds lr, beta1, beta2, eps, weight decay, the step size lr / (1 - beta1^t) and 1 / sqrt(1 - beta2^t)
    (the bias corrections); a bf16 weight is rounded stochastically with random bits from `seed` when `rounding`
    (Gupta et al. 2015), to nearest otherwise."""
    lr, beta1, beta2, eps, decay, step_size, inverse_root_correction2 = hyper.unbind()
    g = grad.float()
    m = _decode_signed(m_codes, m_scale) * beta1 + g * (1 - beta1)
    r = _decode_unsigned(r_codes, r_scale)
    v = r * r * beta2 + g * g * (1 - beta2)
    m_scale.copy_(m.abs().amax(dim=1, keepdim=True).clamp_min(TINY))
    r_scale.copy_(v.amax(dim=1, keepdim=True).sqrt().clamp_min(TINY))  # the largest of v: one square root per row
    r = v.sqrt()
    w = weight.float() * (1 - lr * decay)
    w = w - step_size * m / (r * inverse_root_correction2 + eps)
    if rounding and weight.dtype == torch.bfloat16:
        w = (w.view(torch.int32) + random_low_bits(w, seed)).bitwise_and(-LOW_BITS).view(torch.float32)
    weight.copy_(w)
    m_codes.copy_(_encode(m, m_scale, SIGNED_LEVELS, torch.int8))
    r_codes.copy_(_encode(r, r_scale, UNSIGNED_LEVELS, torch.uint8))


def compiled_update(*args) -> bool:
    """Run update_rows compiled (once per process for any number of rows of a block each); False, with a warning,
    where it cannot be compiled (no C++ compiler, say), having changed nothing."""
    if not _compiled:
        _compiled.append(torch.compile(update_rows))
    for tensor in args[:6]:
        torch._dynamo.maybe_mark_dynamic(tensor, 0)
    try:
        _compiled[0](*args)
    except Exception as err:  # noqa: BLE001 - a failure to compile leaves the eager update, which is as correct
        logger.warning("AdamW8bit: torch.compile failed (%s: %s); stepping without it, which is slower",
                       type(err).__name__, err)
        return False
    return True


class AdamW8bit(torch.optim.Optimizer):
    """AdamW (torch's equations, decoupled weight decay) with 8-bit moments; a bf16 weight is stepped in fp32 and
    rounded stochastically (`stochastic_rounding`). `compile`: fuse each update into one kernel with torch.compile
    (eager when false, or when this machine cannot compile)."""

    rounds_bf16 = True  # make_optimizer: this optimizer rounds bf16 weights itself

    def __init__(self, params: Iterable, lr: float = 1e-3, betas: tuple[float, float] = (0.9, 0.999),
                 eps: float = 1e-8, weight_decay: float = 1e-2, stochastic_rounding: bool = True,
                 compile: bool = True):
        if lr < 0 or eps < 0 or weight_decay < 0 or not all(0 <= b < 1 for b in betas):
            raise ValueError(f"AdamW8bit: lr {lr}, eps {eps} and weight_decay {weight_decay} must be >= 0, and "
                             f"betas {tuple(betas)} in [0, 1)")
        super().__init__(params, dict(lr=lr, betas=tuple(betas), eps=eps, weight_decay=weight_decay,
                                      stochastic_rounding=stochastic_rounding, compile=compile))

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
        state["step"] += 1
        step = state["step"].item()
        beta1, beta2 = group["betas"]
        hyper = torch.tensor([group["lr"], beta1, beta2, group["eps"], group["weight_decay"],
                              group["lr"] / (1 - beta1 ** step), (1 - beta2 ** step) ** -0.5],
                             dtype=torch.float32, device=p.device)
        seed = torch.randint(-2 ** 31, 2 ** 31, (), dtype=torch.int32).to(p.device)
        n, rows = p.numel(), -(-p.numel() // BLOCK)
        weight, grad = p.data.view(-1), p.grad.reshape(-1)
        if rows * BLOCK > n:  # the last block is short: step zero-padded copies (at most a few KB: biases, norms)
            weight, grad = (F.pad(t, (0, rows * BLOCK - n)) for t in (weight, grad))
        args = (weight.view(rows, BLOCK), grad.view(rows, BLOCK), state["exp_avg_codes"].view(rows, BLOCK),
                state["exp_avg_scale"].view(rows, 1), state["exp_avg_sqrt_codes"].view(rows, BLOCK),
                state["exp_avg_sqrt_scale"].view(rows, 1), hyper, seed, group["stochastic_rounding"])
        if group["compile"] and not compiled_update(*args):
            group["compile"] = False
        if not group["compile"]:
            update_rows(*args)
        if weight.numel() > n:
            p.data.view(-1).copy_(weight[:n])

    @staticmethod
    def _new_state(p: Tensor) -> dict:
        """Zero moments: one code byte per element (the last block padded) and one float32 scale per block."""
        blocks = -(-p.numel() // BLOCK)
        n = blocks * BLOCK
        return {"step": torch.tensor(0.0),
                "exp_avg_codes": torch.zeros(n, dtype=torch.int8, device=p.device),
                "exp_avg_scale": torch.full((blocks,), TINY, device=p.device),
                "exp_avg_sqrt_codes": torch.zeros(n, dtype=torch.uint8, device=p.device),
                "exp_avg_sqrt_scale": torch.full((blocks,), TINY, device=p.device)}
