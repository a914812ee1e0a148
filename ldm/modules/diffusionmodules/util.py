"""Small building blocks shared by the UNet: timestep embedding, normalisation, zero init, gradient checkpointing."""
import math
from typing import Any, Callable, Sequence

import torch
import torch.utils.checkpoint
import torch.nn.functional as F
from torch import nn


def timestep_embedding(timesteps: torch.Tensor, dim: int, max_period: int = 10000) -> torch.Tensor:
    """Sinusoidal embedding [N, dim] of 1-D timesteps, cosines first then sines (Vaswani et al. 2017, Sec. 3.5)."""
    if dim % 2:
        raise ValueError(f"timestep embedding dim must be even, got {dim}")
    half = dim // 2
    exponents = torch.arange(half, dtype=torch.float32, device=timesteps.device) / half
    freqs = torch.exp(-math.log(max_period) * exponents)
    args = timesteps[:, None].float() * freqs[None]
    return torch.cat([torch.cos(args), torch.sin(args)], dim=-1)


def zero_module(module: nn.Module) -> nn.Module:
    """Zero all parameters of `module` in place and return it."""
    for p in module.parameters():
        nn.init.zeros_(p)
    return module


class GroupNorm32(nn.GroupNorm):
    """GroupNorm computed in float32 (input and affine parameters) and cast back to the input dtype."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.group_norm(x.float(), self.num_groups, self.weight.float(), self.bias.float(), self.eps)
        return out.type(x.dtype)


def normalization(channels: int, eps: float = 1e-5) -> GroupNorm32:
    """GroupNorm with 32 groups (Wu & He 2018) over `channels`, as used throughout the SD v1 UNet."""
    return GroupNorm32(32, channels, eps=eps)


def checkpoint(func: Callable[..., Any], inputs: Sequence[Any], enabled: bool) -> Any:
    """Call `func(*inputs)`, recomputing its activations in backward when enabled and grad is on (Chen et al. 2016)."""
    if enabled and torch.is_grad_enabled():
        return torch.utils.checkpoint.checkpoint(func, *inputs, use_reentrant=False)
    return func(*inputs)
