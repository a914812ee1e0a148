"""What the GPU self-check (scripts/gpu_check.py) measures inside one process: the versions and the device, which
SDPA kernels serve the model's attention shapes, the 8-bit AdamW kernel compiled against its eager update, the FLOPs
of one training step (counted on the `meta` device), and the peak dense throughput of known cards."""
import importlib.metadata
import json
import logging
import platform
import re
import sys
import warnings
from pathlib import Path
from typing import Any, Callable, Optional

import torch
import torch.nn.functional as F
from omegaconf import DictConfig
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

from ldm.config import latent_shape
from ldm.util import instantiate_from_config, peak_memory_stats

logger = logging.getLogger(__name__)

GiB = 2 ** 30
# Peak dense bf16 tensor-core TFLOP/s (fp16 where the card has no bf16) by a pattern of torch's device name; the
# first match wins, so the PCIe H100 comes before the SXM one.
PEAK_TFLOPS = ((r"\bH100\b.*\bPCIe\b", 756.0), (r"\bH100\b", 989.0), (r"\bH200\b", 989.0), (r"\bA100\b", 312.0),
               (r"\bL4\b", 121.0), (r"RTX 4090\b", 165.0), (r"RTX 3090(?! Ti)\b", 71.0), (r"\bA10\b", 125.0),
               (r"\bT4\b", 65.0))
BACKENDS = {"flash": SDPBackend.FLASH_ATTENTION, "memory-efficient": SDPBackend.EFFICIENT_ATTENTION,
            "cuDNN": SDPBackend.CUDNN_ATTENTION, "math": SDPBackend.MATH}


def peak_tflops(name: str) -> Optional[float]:
    """The card's peak dense bf16 TFLOP/s from PEAK_TFLOPS, or None for a card not in the table."""
    return next((tflops for pattern, tflops in PEAK_TFLOPS if re.search(pattern, name)), None)


def package_version(name: str) -> Optional[str]:
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return None


def cpu_name() -> str:
    """The CPU's model name where Linux says it, else what the platform module knows."""
    info = Path("/proc/cpuinfo")
    if info.is_file():
        match = re.search(r"^model name\s*:\s*(.+)$", info.read_text(errors="replace"), re.M)
        if match:
            return match.group(1).strip()
    return platform.processor() or platform.machine()


def triton_version() -> str:
    """Triton's version, or why it cannot be imported (native Windows has none: the 8-bit kernel then runs eagerly)."""
    try:
        import triton
    except Exception as err:  # noqa: BLE001 - an old or broken Triton fails in many ways; the line says which
        return f"not importable ({type(err).__name__})"
    return triton.__version__


def environment(device: torch.device) -> dict[str, Any]:
    """Versions, the device's name, compute capability, native bf16, free and total memory, and its peak TFLOP/s."""
    info: dict[str, Any] = {
        "python": platform.python_version(), "torch": torch.__version__,
        "lightning": package_version("pytorch-lightning") or package_version("lightning"),
        "cuda": torch.version.cuda, "cudnn": torch.backends.cudnn.version() if torch.backends.cudnn.is_available()
        else None, "triton": triton_version(), "platform": sys.platform, "device": device.type}
    if device.type != "cuda":
        return {**info, "name": cpu_name(), "capability": torch.backends.cpu.get_cpu_capability(),
                "bf16_native": None, "free_gib": None, "total_gib": None, "peak_tflops": None}
    props = torch.cuda.get_device_properties(device)
    free, total = torch.cuda.mem_get_info(device)
    return {**info, "name": props.name, "capability": f"{props.major}.{props.minor}",
            "bf16_native": torch.cuda.is_bf16_supported(including_emulation=False), "free_gib": free / GiB,
            "total_gib": total / GiB, "peak_tflops": peak_tflops(props.name)}


def attention_shapes(config: DictConfig, size: int) -> dict[str, tuple[int, int, int]]:
    """(heads, tokens, head dim) of the UNet's self-attention at each head dim, at the largest feature map that has
    it, and of the VAE's attention (one head over the channels of its middle block), for `size` px images."""
    unet = config.model.params.unet_config.params
    _, height, width = latent_shape(config, size, size)
    channels = [unet.model_channels * m for m in unet.channel_mult]
    levels = [i for i in range(len(channels)) if 2 ** i in unet.attention_resolutions] + [len(channels) - 1]
    shapes: dict[str, tuple[int, int, int]] = {}
    for level in levels:  # the last level's is the middle block's
        ch = channels[level]
        heads = unet.num_heads if unet.get("num_head_channels", -1) == -1 else ch // unet.num_head_channels
        shapes.setdefault(f"UNet head dim {ch // heads}", (heads, (height >> level) * (width >> level), ch // heads))
    dd = config.model.params.first_stage_config.params.ddconfig
    vae_side = size // 2 ** (len(dd.ch_mult) - 1)
    shapes[f"VAE 1 head of {dd.ch * dd.ch_mult[-1]}"] = (1, vae_side * vae_side, dd.ch * dd.ch_mult[-1])
    return shapes


def sdpa_kernels(shapes: dict[str, tuple[int, int, int]], dtype: torch.dtype,
                 device: torch.device) -> dict[str, dict[str, bool]]:
    """For each shape, which SDPA backends run it: each tried alone with `sdpa_kernel` on a batch of one."""
    served: dict[str, dict[str, bool]] = {}
    for label, (heads, tokens, dim) in shapes.items():
        q = torch.randn(1, heads, tokens, dim, device=device, dtype=dtype)
        served[label] = {}
        for name, backend in BACKENDS.items():
            try:
                with sdpa_kernel([backend]), warnings.catch_warnings():
                    warnings.simplefilter("ignore")  # torch says why a kernel does not apply; the table says whether
                    F.scaled_dot_product_attention(q, q, q)
                served[label][name] = True
            except RuntimeError:
                served[label][name] = False
    return served


def step_flops(config: DictConfig, size: int) -> int:
    """FLOPs of one training step of the config's model (forward and backward, a batch of one instance and one class
    example at `size` px), counted with FlopCounterMode on the `meta` device: no memory, no device time."""
    with torch.device("meta"):
        model = instantiate_from_config(config.model)
    model.train()
    image, images, captions = torch.zeros(1, size, size, 3, device="meta"), model.first_stage_key, model.cond_stage_key
    batch = {images: image, captions: ["a photo of sks dog"], f"class_{images}": image,
             f"class_{captions}": ["a photo of dog"]}
    with FlopCounterMode(display=False) as counter:
        model.shared_step(batch)["loss"].backward()
    return counter.get_total_flops()


def cuda_peaks(device: torch.device) -> dict[str, Optional[float]]:
    """ldm.util.peak_memory_stats's CUDA peaks (allocated and reserved) in GiB (None off CUDA)."""
    stats = peak_memory_stats(device)
    peaks = {kind: stats[f"cuda_max_{kind}_bytes"] for kind in ("allocated", "reserved")}
    return {f"peak_{kind}_gib": None if value is None else value / GiB for kind, value in peaks.items()}


def run_stage(spec_path: str, workers: dict[str, Callable[[dict], dict]]) -> int:
    """One stage's process: the memory cap, then the spec's worker, whose result goes to the spec's output as JSON."""
    spec = json.loads(Path(spec_path).read_text())
    if spec["device"] == "cuda" and spec.get("memory_fraction"):
        torch.cuda.set_per_process_memory_fraction(spec["memory_fraction"])
    result = workers[spec["worker"]](spec)
    Path(spec["output"]).write_text(json.dumps(result, indent=1))
    return 0
