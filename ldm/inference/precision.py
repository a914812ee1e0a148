"""Which devices compute bf16 natively, and the training precisions that are refused or warned about: the one place
that decides, for main.py and the sampling scripts."""
import logging

import torch

from ldm.util import UserError

logger = logging.getLogger(__name__)

BF16_CARDS = "Ampere or newer: RTX 30xx/40xx/50xx, A100, H100"  # compute capability 8.0 and up


def cpu_has_bf16() -> bool:
    """Whether this CPU computes bf16 natively (AVX-512 or AMX); with AVX2 only, bf16 is emulated."""
    return torch.ops.mkldnn._is_mkldnn_bf16_supported()


def cuda_has_bf16(device: torch.device) -> bool:
    """Whether a CUDA GPU computes bf16 natively (compute capability 8.0 or more); on older cards it is emulated and
    scaled_dot_product_attention falls back to its math kernel."""
    with torch.cuda.device(device):
        return torch.cuda.is_bf16_supported(including_emulation=False)


def gpu_name(device: torch.device) -> str:
    """The GPU's name and compute capability, e.g. "Tesla T4, compute capability 7.5"."""
    major, minor = torch.cuda.get_device_capability(device)
    return f"{torch.cuda.get_device_name(device)}, compute capability {major}.{minor}"


def check_training_precision(device: torch.device, precision: str) -> None:
    """Refuse `16-true` and bf16 on a GPU that emulates it; warn of bf16 on a CPU that emulates it."""
    if precision == "16-true":
        raise UserError("--precision 16-true keeps the weights in fp16 and rounds every update to nearest without "
                        "loss scaling, so small updates are lost: use --precision 16-mixed (fp16 compute on fp32 "
                        "weights) or bf16-true (bf16 weights, updated with stochastic rounding)")
    if "bf16" not in precision:
        return
    if device.type == "cuda" and not cuda_has_bf16(device):
        raise UserError(f"--precision {precision}: this GPU ({gpu_name(device)}) has no native bfloat16, so bf16 is "
                        "emulated and attention falls back to its slow math kernel; use --precision 16-mixed (without "
                        f"--fused_backward), or --precision 32 with the other memory savers (bf16 needs {BF16_CARDS})")
    if device.type == "cpu" and not cpu_has_bf16():
        logger.warning("--precision %s on a CPU without bf16 instructions (%s): bf16 is emulated here and several "
                       "times slower than float32; --precision 32 keeps the other memory savers "
                       "(docs/memory-and-speed.md)", precision, torch.backends.cpu.get_cpu_capability())
