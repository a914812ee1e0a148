"""sd-gpu-check's light stage processes (env, sdpa, adamw8bit): no transformers, no Lightning, so that they
start in a second."""
import sys
from pathlib import Path

BENCHMARKS = Path(__file__).resolve().parent
sys.path[:0] = [str(BENCHMARKS.parents[1]), str(BENCHMARKS.parent)]  # ldm, and benchmarks/

import torch  # noqa: E402

from benchmarks import device_check  # noqa: E402
from benchmarks.device_check import run_stage  # noqa: E402
from ldm.config import load_config  # noqa: E402
from ldm.optim.adamw8bit import adamw8bit_self_check  # noqa: E402


def worker_env(spec: dict) -> dict:
    return device_check.environment(torch.device(spec["device"]))


def worker_sdpa(spec: dict) -> dict:
    shapes = device_check.attention_shapes(load_config(spec["config"]), spec["size"])
    return device_check.sdpa_kernels(shapes, getattr(torch, spec["dtype"]), torch.device(spec["device"]))


def worker_adamw8bit(spec: dict) -> dict:
    """The 8-bit kernel compiled on the device: ldm.optim.adamw8bit.adamw8bit_self_check (parity with the eager update,
    rounding bias, host syncs per step)."""
    return adamw8bit_self_check(torch.device(spec["device"]))


WORKERS = {"env": worker_env, "sdpa": worker_sdpa, "adamw8bit": worker_adamw8bit}

if __name__ == "__main__":
    sys.exit(run_stage(sys.argv[1], WORKERS))
