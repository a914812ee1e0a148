"""Learning-rate schedules as factors of the base rate per optimizer step: the named schedules that DreamBooth trainers
share (`model.params.lr_schedule`), and CompVis' `LambdaLinearScheduler` (`model.params.scheduler_config`)."""
import math
from dataclasses import dataclass
from typing import Callable, Optional, Sequence

from ldm.util import UserError

SCHEDULES = ("constant", "constant_with_warmup", "linear", "cosine", "cosine_with_restarts", "polynomial")


@dataclass
class LRSchedule:
    """A linear warmup from 0 over `warmup_steps` (a fraction of max_steps when below 1), then a decay to the floor
    `min_lr_ratio` at max_steps: linear 1 - p, cosine (1 + cos(pi p)) / 2, cosine_with_restarts the same over each
    of `num_cycles` cycles, polynomial (1 - p) ** power, with p the fraction of the steps after warmup."""

    name: str = "constant"
    warmup_steps: float = 0
    num_cycles: int = 1
    power: float = 1.0
    min_lr_ratio: float = 0.0

    def check(self) -> None:
        if self.name not in SCHEDULES:
            raise UserError(f"lr_schedule {self.name!r} (--lr_scheduler): expected one of {', '.join(SCHEDULES)}")
        if self.warmup_steps < 0:
            raise UserError(f"--lr_warmup_steps {self.warmup_steps} is below 0")
        if self.name == "constant" and self.warmup_steps:
            raise UserError("--lr_warmup_steps with the constant schedule: choose --lr_scheduler constant_with_warmup")
        if not 0 <= self.min_lr_ratio <= 1:
            raise UserError(f"lr_schedule.min_lr_ratio {self.min_lr_ratio} is not within [0, 1]")
        if self.num_cycles < 1 or self.power <= 0:
            raise UserError(f"lr_schedule needs num_cycles >= 1 and power > 0, got {self.num_cycles}, {self.power}")

    def warmup(self, max_steps: int) -> int:
        return round(self.warmup_steps * max_steps) if self.warmup_steps < 1 else int(self.warmup_steps)

    def factor(self, step: int, max_steps: int) -> float:
        """The learning rate of optimizer step `step` (0 is the first) as a fraction of the base rate."""
        warmup = self.warmup(max_steps)
        if step < warmup:
            return step / warmup
        if self.name in ("constant", "constant_with_warmup"):
            return 1.0
        p = min(1.0, (step - warmup) / max(1, max_steps - warmup))
        if self.name == "linear":
            decay = 1 - p
        elif self.name == "cosine":
            decay = 0.5 * (1 + math.cos(math.pi * p))
        elif self.name == "cosine_with_restarts":
            decay = 0.0 if p >= 1 else 0.5 * (1 + math.cos(math.pi * ((self.num_cycles * p) % 1)))
        else:
            decay = (1 - p) ** self.power
        return self.min_lr_ratio + (1 - self.min_lr_ratio) * decay


class LambdaLinearScheduler:
    """CompVis' schedule, kept so that its configs work: cycles of `cycle_lengths` steps, each a linear warmup from
    f_start to f_max over warm_up_steps, then a linear ramp from f_max towards f_min at the cycle's end."""

    def __init__(self, warm_up_steps: Sequence[int], f_min: Sequence[float], f_max: Sequence[float],
                 f_start: Sequence[float], cycle_lengths: Sequence[int], verbosity_interval: int = 0):
        lengths = {len(v) for v in (warm_up_steps, f_min, f_max, f_start, cycle_lengths)}
        if len(lengths) != 1:
            raise UserError("scheduler_config: warm_up_steps, f_min, f_max, f_start and cycle_lengths need one value "
                            "per cycle")
        del verbosity_interval  # accepted for CompVis configs; the learning rate is logged every step instead
        self.warm_up_steps, self.cycle_lengths = list(warm_up_steps), list(cycle_lengths)
        self.f_min, self.f_max, self.f_start = list(f_min), list(f_max), list(f_start)
        self.cycle_ends = [sum(self.cycle_lengths[:i + 1]) for i in range(len(self.cycle_lengths))]

    def schedule(self, n: int) -> float:
        cycle = next((i for i, end in enumerate(self.cycle_ends) if n <= end), len(self.cycle_ends) - 1)
        n -= self.cycle_ends[cycle] - self.cycle_lengths[cycle]
        if n < self.warm_up_steps[cycle]:
            return self.f_start[cycle] + (self.f_max[cycle] - self.f_start[cycle]) * n / self.warm_up_steps[cycle]
        length = self.cycle_lengths[cycle]
        return self.f_min[cycle] + (self.f_max[cycle] - self.f_min[cycle]) * (length - n) / length


def lr_lambda(schedule: Optional[LRSchedule], compvis: Optional[Callable[[int], float]],
              max_steps: int) -> Callable[[int], float]:
    """The factor per step for torch's LambdaLR: CompVis' schedule, or the named one."""
    if compvis is not None:
        return compvis
    return lambda step: schedule.factor(step, max_steps)
