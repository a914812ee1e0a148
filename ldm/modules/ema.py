"""Exponential moving average of a module's parameters, stored as buffers under the LitEma names of SD v1 files."""
import torch
from torch import nn


class LitEma(nn.Module):
    """Shadow copy of `model`'s trainable parameters; buffer names are the parameter paths with the dots removed. The
    shadow may live on another device than the model (the CPU, so that it costs no GPU memory)."""

    def __init__(self, model: nn.Module, decay: float = 0.9999, use_num_updates: bool = True):
        super().__init__()
        if not 0.0 <= decay <= 1.0:
            raise ValueError(f"EMA decay must be between 0 and 1, got {decay}")
        self.register_buffer("decay", torch.tensor(decay, dtype=torch.float32))
        self.register_buffer("num_updates", torch.tensor(0 if use_num_updates else -1, dtype=torch.int))
        self.shadow_names: dict[str, str] = {}
        for name, param in model.named_parameters():
            if param.requires_grad:
                shadow = name.replace(".", "")
                self.shadow_names[name] = shadow
                self.register_buffer(shadow, param.detach().clone())
        self.backup: list[torch.Tensor] = []

    @torch.no_grad()
    def forward(self, model: nn.Module) -> None:
        """One EMA step; the decay warms up as (1 + n) / (10 + n) while `num_updates` counts."""
        decay = float(self.decay)
        if self.num_updates >= 0:
            self.num_updates += 1
            decay = min(decay, (1 + float(self.num_updates)) / (10 + float(self.num_updates)))
        buffers = dict(self.named_buffers())
        for name, param in model.named_parameters():
            if name in self.shadow_names:
                shadow = buffers[self.shadow_names[name]]
                shadow.sub_((1.0 - decay) * (shadow - param.to(shadow.device, shadow.dtype)))

    @torch.no_grad()
    def copy_to(self, model: nn.Module) -> None:
        """Write the averaged weights into `model`."""
        buffers = dict(self.named_buffers())
        for name, param in model.named_parameters():
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
