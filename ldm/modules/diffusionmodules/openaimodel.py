"""The Stable Diffusion v1 UNet with CompVis module names (Ronneberger et al. 2015; Rombach et al. 2022)."""
from typing import Optional, Sequence

import torch
from torch import nn

from ldm.modules.attention import SpatialTransformer
from ldm.modules.diffusionmodules.util import checkpoint, normalization, timestep_embedding, zero_module


class ResBlock(nn.Module):
    """Residual block conditioned on the timestep embedding by addition (Ho et al. 2020, App. B)."""

    def __init__(
        self,
        channels: int,
        emb_channels: int,
        dropout: float,
        out_channels: Optional[int] = None,
        use_checkpoint: bool = False,
    ) -> None:
        super().__init__()
        out_channels = channels if out_channels is None else out_channels
        self.in_layers = nn.Sequential(
            normalization(channels), nn.SiLU(), nn.Conv2d(channels, out_channels, 3, padding=1)
        )
        self.emb_layers = nn.Sequential(nn.SiLU(), nn.Linear(emb_channels, out_channels))
        self.out_layers = nn.Sequential(
            normalization(out_channels),
            nn.SiLU(),
            nn.Dropout(dropout),
            zero_module(nn.Conv2d(out_channels, out_channels, 3, padding=1)),
        )
        if out_channels == channels:
            self.skip_connection = nn.Identity()
        else:
            self.skip_connection = nn.Conv2d(channels, out_channels, 1)
        self.use_checkpoint = use_checkpoint

    def forward(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        return checkpoint(self._forward, (x, emb), self.use_checkpoint)

    def _forward(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        h = self.in_layers(x)
        h = h + self.emb_layers(emb).type(h.dtype)[..., None, None]
        return self.skip_connection(x) + self.out_layers(h)


class Downsample(nn.Module):
    """Halve height and width with a stride-2 3x3 convolution."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.op = nn.Conv2d(channels, channels, 3, stride=2, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.op(x)


class Upsample(nn.Module):
    """Double height and width by nearest-neighbour interpolation, then a 3x3 convolution."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(nn.functional.interpolate(x, scale_factor=2, mode="nearest"))


class TimestepEmbedSequential(nn.Sequential):
    """Sequential that hands the timestep embedding to ResBlocks and the context to SpatialTransformers."""

    def forward(self, x: torch.Tensor, emb: torch.Tensor, context: Optional[torch.Tensor] = None) -> torch.Tensor:
        for layer in self:
            if isinstance(layer, ResBlock):
                x = layer(x, emb)
            elif isinstance(layer, SpatialTransformer):
                x = layer(x, context)
            else:
                x = layer(x)
        return x


def _check_sd_v1_options(**options: object) -> None:
    """Raise for CompVis UNet options that Stable Diffusion v1 never uses and this UNet does not build."""
    supported = {
        "conv_resample": True, "dims": 2, "num_classes": None, "use_fp16": False, "num_heads_upsample": -1,
        "use_scale_shift_norm": False, "resblock_updown": False, "use_new_attention_order": False,
        "use_spatial_transformer": True, "n_embed": None,
    }
    for name, value in options.items():
        if value != supported[name]:
            raise ValueError(f"UNetModel: {name}={value!r} is not supported (SD v1 uses {supported[name]!r})")


class UNetModel(nn.Module):
    """Noise-prediction UNet eps(x_t, t, c) with cross-attention on `context`; state-dict keys match SD v1."""

    def __init__(
        self,
        image_size: int,
        in_channels: int,
        model_channels: int,
        out_channels: int,
        num_res_blocks: int,
        attention_resolutions: Sequence[int],
        dropout: float = 0.0,
        channel_mult: Sequence[int] = (1, 2, 4, 8),
        conv_resample: bool = True,
        dims: int = 2,
        num_classes: Optional[int] = None,
        use_checkpoint: bool = False,
        use_fp16: bool = False,
        num_heads: int = -1,
        num_head_channels: int = -1,
        num_heads_upsample: int = -1,
        use_scale_shift_norm: bool = False,
        resblock_updown: bool = False,
        use_new_attention_order: bool = False,
        use_spatial_transformer: bool = False,
        transformer_depth: int = 1,
        context_dim: Optional[int] = None,
        n_embed: Optional[int] = None,
        legacy: bool = True,
    ) -> None:
        super().__init__()
        _check_sd_v1_options(
            conv_resample=conv_resample, dims=dims, num_classes=num_classes, use_fp16=use_fp16,
            num_heads_upsample=num_heads_upsample, use_scale_shift_norm=use_scale_shift_norm,
            resblock_updown=resblock_updown, use_new_attention_order=use_new_attention_order,
            use_spatial_transformer=use_spatial_transformer, n_embed=n_embed,
        )
        if (num_heads == -1) == (num_head_channels == -1):
            raise ValueError("UNetModel: set exactly one of num_heads and num_head_channels")
        if context_dim is None:
            raise ValueError("UNetModel: the spatial transformer needs context_dim")
        # `legacy` only changes head sizes of the non-spatial AttentionBlock, which SD v1 does not use; accepted as is.
        self.image_size = image_size
        self.in_channels = in_channels
        self.model_channels = model_channels
        self.out_channels = out_channels
        time_embed_dim = model_channels * 4

        def attention(ch: int) -> SpatialTransformer:
            heads = num_heads if num_head_channels == -1 else ch // num_head_channels
            # Dropout reaches only the ResBlocks, as in SD v1 (kept on purpose).
            return SpatialTransformer(
                ch, heads, ch // heads, depth=transformer_depth, context_dim=context_dim, use_checkpoint=use_checkpoint
            )

        def resblock(ch: int, out_ch: int) -> ResBlock:
            return ResBlock(ch, time_embed_dim, dropout, out_channels=out_ch, use_checkpoint=use_checkpoint)

        self.time_embed = nn.Sequential(
            nn.Linear(model_channels, time_embed_dim), nn.SiLU(), nn.Linear(time_embed_dim, time_embed_dim)
        )

        self.input_blocks = nn.ModuleList(
            [TimestepEmbedSequential(nn.Conv2d(in_channels, model_channels, 3, padding=1))]
        )
        skip_chans = [model_channels]
        ch, ds = model_channels, 1
        for level, mult in enumerate(channel_mult):
            for _ in range(num_res_blocks):
                layers: list[nn.Module] = [resblock(ch, mult * model_channels)]
                ch = mult * model_channels
                if ds in attention_resolutions:
                    layers.append(attention(ch))
                self.input_blocks.append(TimestepEmbedSequential(*layers))
                skip_chans.append(ch)
            if level != len(channel_mult) - 1:
                self.input_blocks.append(TimestepEmbedSequential(Downsample(ch)))
                skip_chans.append(ch)
                ds *= 2

        self.middle_block = TimestepEmbedSequential(resblock(ch, ch), attention(ch), resblock(ch, ch))

        self.output_blocks = nn.ModuleList()
        for level, mult in reversed(list(enumerate(channel_mult))):
            for i in range(num_res_blocks + 1):
                layers = [resblock(ch + skip_chans.pop(), mult * model_channels)]
                ch = mult * model_channels
                if ds in attention_resolutions:
                    layers.append(attention(ch))
                if level and i == num_res_blocks:
                    layers.append(Upsample(ch))
                    ds //= 2
                self.output_blocks.append(TimestepEmbedSequential(*layers))

        self.out = nn.Sequential(
            normalization(ch), nn.SiLU(), zero_module(nn.Conv2d(model_channels, out_channels, 3, padding=1))
        )

    def forward(self, x: torch.Tensor, timesteps: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        """Predict the noise in `x` [B, C, H, W] at `timesteps` [B] (integer or fractional) given `context` [B, L, context_dim]."""
        emb = self.time_embed(timestep_embedding(timesteps, self.model_channels).to(x.dtype))
        skips = []
        h = x
        for block in self.input_blocks:
            h = block(h, emb, context)
            skips.append(h)
        h = self.middle_block(h, emb, context)
        for block in self.output_blocks:
            h = block(torch.cat([h, skips.pop()], dim=1), emb, context)
        return self.out(h)
