"""ControlNet (Zhang, Rao & Agrawala 2023): a copy of the UNet's encoder half, fed a hint image, whose zero-initialised
1x1 convs give one residual per skip connection and one for the middle block; state-dict keys as lllyasviel's files
(below `control_model.`)."""
from typing import Sequence

import torch
from torch import nn

from ldm.modules.diffusionmodules.openaimodel import UNetBlocks, check_sd_v1_options
from ldm.modules.diffusionmodules.util import timestep_embedding, zero_module

HINT_CHANNELS = (16, 16, 32, 32, 96, 96, 256)  # the hint encoder's convs before the last one (to model_channels)
HINT_STRIDES = (1, 1, 2, 1, 2, 1, 2)  # 8x down: a hint at image size meets the latents
HINT_DOWNSAMPLING = 8


def hint_encoder(hint_channels: int, model_channels: int) -> nn.Sequential:
    """3x3 convs 3 -> 16 -> 16 -> 32 -> 32 -> 96 -> 96 -> 256 -> model_channels with SiLU between, stride 2 at the
    3rd, 5th and 7th, the last one zero-initialised (keys input_hint_block.0, .2, ..., .14)."""
    layers: list[nn.Module] = []
    ch = hint_channels
    for out_ch, stride in zip(HINT_CHANNELS, HINT_STRIDES):
        layers += [nn.Conv2d(ch, out_ch, 3, padding=1, stride=stride), nn.SiLU()]
        ch = out_ch
    layers.append(zero_module(nn.Conv2d(ch, model_channels, 3, padding=1)))
    return nn.Sequential(*layers)


def zero_conv(channels: int) -> nn.Sequential:
    """A zero-initialised 1x1 conv, wrapped as the original's (keys `<name>.0.weight`)."""
    return nn.Sequential(zero_module(nn.Conv2d(channels, channels, 1)))


class ControlNet(nn.Module):
    """Residuals for a UNet built with the same options: `forward` returns one per input block, then the middle's."""

    def __init__(self, image_size: int, in_channels: int, hint_channels: int, model_channels: int,
                 num_res_blocks: int, attention_resolutions: Sequence[int], dropout: float = 0.0,
                 channel_mult: Sequence[int] = (1, 2, 4, 8), use_checkpoint: bool = False, num_heads: int = -1,
                 num_head_channels: int = -1, use_spatial_transformer: bool = False, transformer_depth: int = 1,
                 context_dim: int | None = None, legacy: bool = True, **sd_v1_options: object) -> None:
        super().__init__()
        check_sd_v1_options(use_spatial_transformer=use_spatial_transformer, **sd_v1_options)
        blocks = UNetBlocks(model_channels, num_heads, num_head_channels, transformer_depth, context_dim, dropout,
                            use_checkpoint)
        self.image_size = image_size
        self.model_channels = model_channels
        self.time_embed = blocks.time_embed()
        self.input_hint_block = hint_encoder(hint_channels, model_channels)
        self.input_blocks, skip_chans = blocks.input_blocks(in_channels, num_res_blocks, attention_resolutions,
                                                            channel_mult)
        self.zero_convs = nn.ModuleList(zero_conv(ch) for ch in skip_chans)
        self.middle_block = blocks.middle_block(skip_chans[-1])
        self.middle_block_out = zero_conv(skip_chans[-1])

    def forward(self, x: torch.Tensor, hint: torch.Tensor, timesteps: torch.Tensor,
                context: torch.Tensor) -> list[torch.Tensor]:
        """The residuals for latents `x` [B, C, h, w] under `hint` [B, 3, 8h, 8w] (in [0, 1]) at `timesteps`."""
        if hint.shape[-2:] != tuple(HINT_DOWNSAMPLING * s for s in x.shape[-2:]):
            raise ValueError(f"ControlNet: a hint of {tuple(hint.shape[-2:])} pixels for latents of "
                             f"{tuple(x.shape[-2:])}; it must be {HINT_DOWNSAMPLING}x their size")
        emb = self.time_embed(timestep_embedding(timesteps, self.model_channels).to(x.dtype))
        h = self.input_blocks[0](x, emb, context) + self.input_hint_block(hint.to(x.dtype))
        residuals = [self.zero_convs[0](h)]
        for block, conv in zip(self.input_blocks[1:], self.zero_convs[1:]):
            h = block(h, emb, context)
            residuals.append(conv(h))
        return residuals + [self.middle_block_out(self.middle_block(h, emb, context))]
