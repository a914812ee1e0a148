"""Exponential moving average of a module's parameters, stored as buffers under the LitEma names of SD v1 files."""
from typing import Callable, Iterable, Mapping, Optional

import torch
from torch import nn

CHUNK_ELEMENTS = 1 << 26  # at most this many elements of weights cast to float32 (or copied to the CPU) at once

Averaged = nn.Module | Mapping[str, nn.Parameter]  # a module's parameters, or parameters by name


def named_parameters(source: Averaged) -> Iterable[tuple[str, nn.Parameter]]:
    """The parameters of a module, or of a mapping, with their names."""
    return source.named_parameters() if isinstance(source, nn.Module) else source.items()


class LitEma(nn.Module):
    """Float32 shadow copy of `model`'s trainable parameters (those whose names `include` accepts, when given: an
    adapter run's adapter weights), and of those `track` adds; `model` is a module or a mapping of parameters by name;
    buffer names are the parameter paths with the dots removed. The buffers follow the module's moves between devices
    but never its casts (bf16-true keeps a float32 average and an exact decay); with `device` they stay there (the
    CPU: no GPU memory, a host copy per step)."""

    def __init__(self, model: Averaged, decay: float = 0.9999, use_num_updates: bool = True,
                 device: Optional[str | torch.device] = None, include: Optional[Callable[[str], bool]] = None):
        super().__init__()
        if not 0.0 <= decay <= 1.0:
            raise ValueError(f"EMA decay must be between 0 and 1, got {decay}")
        self.decay_rate = float(decay)  # what the update uses; the `decay` buffer records it in the files
        self.pinned = None if device is None else torch.device(device)
        self.register_buffer("decay", torch.tensor(decay, dtype=torch.float32))
        self.register_buffer("num_updates", torch.tensor(0 if use_num_updates else -1, dtype=torch.int))
        self._count: Optional[int] = None  # num_updates on the host (None: read it from the buffer once)
        self.register_load_state_dict_post_hook(lambda module, keys: setattr(module, "_count", None))
        self.shadow_names: dict[str, str] = {}
        for name, param in named_parameters(model):
            if param.requires_grad and (include is None or include(name)):
                self.track(name, param)
        self.backup: list[torch.Tensor] = []

    def track(self, name: str, param: nn.Parameter) -> None:
        """Average `param`, named `name` in the model the updates get, from its value now on."""
        shadow = name.replace(".", "")
        self.shadow_names[name] = shadow
        device = param.device if param.is_meta else self.pinned or param.device  # meta: a file fills it
        self.register_buffer(shadow, param.detach().to(device, torch.float32, copy=True))

    def _apply(self, fn: Callable[[torch.Tensor], torch.Tensor], recurse: bool = True) -> "LitEma":
        """Move the buffers where `fn` moves tensors (`.to(device)`, `.cuda()`), without its casts."""
        for name, buffer in self._buffers.items():
            if buffer is not None and not buffer.is_meta:
                target = self.pinned or fn(torch.empty(0, device=buffer.device)).device
                self._buffers[name] = buffer.to(target)
        return self

    def next_decay(self) -> float:
        """The decay of the next update, counting it; warmed up as (1 + n) / (10 + n) while `num_updates` counts."""
        if self._count is None:
            self._count = int(self.num_updates)
        if self._count < 0:
            return self.decay_rate
        self._count += 1
        self.num_updates.add_(1)
        return min(self.decay_rate, (1 + self._count) / (10 + self._count))

    @torch.no_grad()
    def forward(self, model: Averaged) -> None:
        """One EMA step, shadow += (1 - decay) (param - shadow), a few fused in-place lerps over all the weights."""
        weight = 1.0 - self.next_decay()
        buffers = dict(self.named_buffers())
        shadows, targets, cast = [], [], 0
        for name, param in named_parameters(model):
            if name not in self.shadow_names:
                continue
            shadow, target = buffers[self.shadow_names[name]], param.detach()
            if target.dtype != shadow.dtype or target.device != shadow.device:
                target = target.to(shadow.device, shadow.dtype)
                cast += target.numel()
            shadows.append(shadow)
            targets.append(target)
            if cast >= CHUNK_ELEMENTS:
                torch._foreach_lerp_(shadows, targets, weight)
                shadows, targets, cast = [], [], 0
        if shadows:
            torch._foreach_lerp_(shadows, targets, weight)

    @torch.no_grad()
    def reset(self, model: Averaged) -> None:
        """Start the average over from `model`'s weights as they are now."""
        buffers = dict(self.named_buffers())
        for name, param in named_parameters(model):
            if name in self.shadow_names:
                buffers[self.shadow_names[name]].copy_(param.detach())

    @torch.no_grad()
    def copy_to(self, model: Averaged) -> None:
        """Write the averaged weights into `model`."""
        buffers = dict(self.named_buffers())
        for name, param in named_parameters(model):
            if name in self.shadow_names:
                param.copy_(buffers[self.shadow_names[name]])

    def store(self, parameters) -> None:
        """Keep a copy of `parameters` to put back with `restore`."""
        self.backup = [p.detach().clone() for p in parameters]

    @torch.no_grad()
    def restore(self, parameters) -> None:
        """Put back the parameters saved by `store`."""
        for saved, param in zip(self.backup, parameters):
            param.copy_(saved)
        self.backup = []
