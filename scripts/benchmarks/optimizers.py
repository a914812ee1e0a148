"""Time the optimizer step alone, for each optimizer named, on parameters of the shapes of a config's UNet (built on
the meta device: no weights are read), with random gradients; prints seconds per step, the state's bytes per
parameter, and both scaled to the whole UNet.

    python scripts/benchmarks/optimizers.py --config configs/stable-diffusion/v1-inference.yaml --million 100 \\
        --optimizers adamw,adamw8bit_torch,adamw8bit --dtype bf16

The first step is reported apart: it allocates the state and, for adamw8bit_torch, compiles its kernel.
"""
import argparse
import statistics
import sys
import time
from pathlib import Path
from typing import Optional, Sequence

sys.path[:0] = [str(Path(__file__).resolve().parents[2]), str(Path(__file__).resolve().parents[1])]

import torch  # noqa: E402

from ldm.cli import run_command  # noqa: E402
from ldm.config import read_yaml  # noqa: E402
from ldm.optim.factory import make_optimizer, state_tensors  # noqa: E402
from ldm.util import UserError, instantiate_from_config  # noqa: E402

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add = parser.add_argument
    add("--config", default="configs/stable-diffusion/v1-inference.yaml", help="a config with model.params.unet_config")
    add("--million", type=float, default=100.0, help="the UNet's first parameters up to this many million (0: all)")
    add("--optimizers", default="adamw,adamw8bit_torch", help="comma-separated names, as --optimizer takes them")
    add("--dtype", choices=sorted(DTYPES), default="fp32", help="the weights' dtype (bf16: as --precision bf16-true)")
    add("--steps", type=int, default=4, help="steps per optimizer; the median is of steps 2..N")
    add("--lr", type=float, default=1e-6)
    return parser.parse_args(argv)


def unet_shapes(config_path: str) -> list[torch.Size]:
    """The shapes of the UNet's parameters, in its order."""
    config = read_yaml(config_path)
    with torch.device("meta"):
        unet = instantiate_from_config(config.model.params.unet_config)
    return [p.shape for p in unet.parameters()]


def take(shapes: list[torch.Size], million: float) -> list[torch.Size]:
    """The first shapes whose sizes add up to at most `million` million elements (all for 0; at least one)."""
    if million <= 0:
        return shapes
    taken, total = [], 0
    for shape in shapes:
        if taken and total + shape.numel() > million * 1e6:
            break
        taken.append(shape)
        total += shape.numel()
    return taken


def time_optimizer(name: str, shapes: list[torch.Size], dtype: torch.dtype, steps: int, lr: float) -> dict:
    """First-step and median later-step seconds of one optimizer, and its state's bytes per parameter."""
    generator = torch.Generator().manual_seed(0)
    params = [torch.nn.Parameter(torch.randn(shape, generator=generator).mul_(0.02).to(dtype)) for shape in shapes]
    for p in params:
        p.grad = torch.randn(p.shape, generator=generator).mul_(1e-3).to(dtype)
    optimizer = make_optimizer({"target": name}, params, lr)
    times = []
    for _ in range(max(steps, 2)):
        start = time.perf_counter()
        optimizer.step()
        times.append(time.perf_counter() - start)
    state = sum(t.numel() * t.element_size() for s in optimizer.state.values() for t in state_tensors(s))
    return {"first": times[0], "step": statistics.median(times[1:]), "bytes": state / sum(p.numel() for p in params)}


def main(argv: Optional[Sequence[str]] = None) -> int:
    opt = parse_args(argv)
    return run_command(lambda: benchmark(opt))


def benchmark(opt: argparse.Namespace) -> None:
    """Time each optimizer of --optimizers on the UNet's parameters that --million selects."""
    try:
        shapes = unet_shapes(opt.config)
    except (OSError, KeyError, AttributeError) as err:
        raise UserError(f"{opt.config}: no UNet config to take shapes from ({err})") from None
    taken = take(shapes, opt.million)
    total, selected = sum(s.numel() for s in shapes), sum(s.numel() for s in taken)
    print(f"{len(taken)} of the UNet's {len(shapes)} parameters: {selected / 1e6:.1f} M of {total / 1e6:.1f} M, "
          f"{opt.dtype}, {torch.get_num_threads()} threads")
    print(f"{'optimizer':<18} {'first step':>10} {'s/step':>8} {'whole UNet':>11} {'state B/param':>14}")
    for name in opt.optimizers.split(","):
        try:
            row = time_optimizer(name, taken, DTYPES[opt.dtype], opt.steps, opt.lr)
        except UserError as err:
            print(f"{name:<18} skipped: {err}")
            continue
        print(f"{name:<18} {row['first']:>9.2f}s {row['step']:>7.3f}s {row['step'] * total / selected:>10.2f}s "
              f"{row['bytes']:>14.2f}", flush=True)


if __name__ == "__main__":
    sys.exit(main())
