"""ControlNet guidance at sampling: which ControlNets act at a model call, on which rows, with what weight.

A model carries a `ControlStack` as `model.control` during sampling (`controlled`); `guided_eps` asks it for the
UNet's residuals, so that every sampler works with it unchanged."""
import contextlib
from dataclasses import dataclass
from typing import Iterator, Optional, Sequence

import torch
from torch import Tensor, nn

GUESS_MODE_DECAY = 0.825  # the original's guess mode: residual i of 13 is scaled by 0.825 ** (12 - i)


@dataclass
class Control:
    """One ControlNet with its hint ([1, 3, H, W] in [0, 1]), its weight and the fraction of the sampling steps
    ([start, end]) during which it acts."""
    net: nn.Module
    hint: Tensor
    strength: float = 1.0
    start: float = 0.0
    end: float = 1.0


class ControlStack:
    """ControlNets whose residuals add up; in guess mode the unconditional half of a guided batch gets none."""

    def __init__(self, controls: Sequence[Control], guess_mode: bool = False) -> None:
        self.controls = list(controls)
        self.guess_mode = guess_mode
        self.schedule: Optional[Tensor] = None

    def plan(self, timesteps: Sequence[float] | Tensor) -> None:
        """The model timestep at the start of each sampling step, first to last; a model call belongs to the step
        whose timestep is nearest (so multi-call samplers count their calls into the steps they fall in)."""
        self.schedule = torch.as_tensor(timesteps, dtype=torch.float32).flatten()

    def acts(self, control: Control, t: Tensor) -> bool:
        """Whether `control` acts at timestep `t` (diffusers' rule: from step i with i / N >= start up to step i with
        (i + 1) / N <= end)."""
        if control.strength == 0:
            return False
        if self.schedule is None or (control.start <= 0 and control.end >= 1):
            return True
        step = int((self.schedule - float(t.flatten()[0])).abs().argmin())
        n = len(self.schedule)
        return step / n >= control.start and (step + 1) / n <= control.end

    def scales(self, strength: float, count: int) -> list[float]:
        """The weight of each of the `count` residuals."""
        if self.guess_mode:
            return [strength * GUESS_MODE_DECAY ** (count - 1 - i) for i in range(count)]
        return [strength] * count

    def residuals(self, x: Tensor, t: Tensor, context: Tensor, n_uncond: int = 0) -> Optional[list[Tensor]]:
        """The summed, weighted residuals for a UNet call on `x` (whose first `n_uncond` rows are the unconditional
        branch of classifier-free guidance), or None when no ControlNet acts at `t`."""
        skip = n_uncond if self.guess_mode else 0
        total: Optional[list[Tensor]] = None
        for control in self.controls:
            if not self.acts(control, t):
                continue
            rows = x.shape[0] - skip
            hint = control.hint.to(x.device, x.dtype).expand(rows, -1, -1, -1)
            outs = control.net(x[skip:], hint, t[skip:], context[skip:])
            outs = [out * scale for out, scale in zip(outs, self.scales(control.strength, len(outs)))]
            if skip:
                outs = [torch.cat([out.new_zeros((skip, *out.shape[1:])), out]) for out in outs]
            total = outs if total is None else [a + b for a, b in zip(total, outs)]
        return total


@contextlib.contextmanager
def controlled(model: nn.Module, stack: Optional[ControlStack]) -> Iterator[nn.Module]:
    """`model` with `stack` as its `control` for the duration (nothing changes for None)."""
    previous = getattr(model, "control", None)
    model.control = stack
    try:
        yield model
    finally:
        model.control = previous
