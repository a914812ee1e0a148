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


SD_V1_OPTIONS = {
    "conv_resample": True, "dims": 2, "num_classes": None, "use_fp16": False, "num_heads_upsample": -1,
    "use_scale_shift_norm": False, "resblock_updown": False, "use_new_attention_order": False,
    "use_spatial_transformer": True, "n_embed": None,
}


def check_sd_v1_options(**options: object) -> None:
    """Raise for CompVis UNet options that Stable Diffusion v1 never uses and this UNet does not build."""
    for name, value in options.items():
        if name not in SD_V1_OPTIONS:
            raise ValueError(f"{name} is not an option of the SD v1 UNet")
        if value != SD_V1_OPTIONS[name]:
            raise ValueError(f"UNetModel: {name}={value!r} is not supported (SD v1 uses {SD_V1_OPTIONS[name]!r})")


class UNetBlocks:
    """The blocks of the UNet's encoder half for one set of options; UNetModel and ControlNet build theirs here."""

    def __init__(self, model_channels: int, num_heads: int, num_head_channels: int, transformer_depth: int,
                 context_dim: Optional[int], dropout: float, use_checkpoint: bool) -> None:
        if (num_heads == -1) == (num_head_channels == -1):
            raise ValueError("UNetModel: set exactly one of num_heads and num_head_channels")
        if context_dim is None:
            raise ValueError("UNetModel: the spatial transformer needs context_dim")
        self.model_channels, self.time_embed_dim = model_channels, model_channels * 4
        self.num_heads, self.num_head_channels = num_heads, num_head_channels
        self.transformer_depth, self.context_dim = transformer_depth, context_dim
        self.dropout, self.use_checkpoint = dropout, use_checkpoint

    def attention(self, ch: int) -> SpatialTransformer:
        heads = self.num_heads if self.num_head_channels == -1 else ch // self.num_head_channels
        # Dropout reaches only the ResBlocks, as in SD v1 (kept on purpose).
        return SpatialTransformer(ch, heads, ch // heads, depth=self.transformer_depth, context_dim=self.context_dim,
                                  use_checkpoint=self.use_checkpoint)

    def resblock(self, ch: int, out_ch: int) -> ResBlock:
        return ResBlock(ch, self.time_embed_dim, self.dropout, out_channels=out_ch, use_checkpoint=self.use_checkpoint)

    def time_embed(self) -> nn.Sequential:
        return nn.Sequential(nn.Linear(self.model_channels, self.time_embed_dim), nn.SiLU(),
                             nn.Linear(self.time_embed_dim, self.time_embed_dim))

    def input_blocks(self, in_channels: int, num_res_blocks: int, attention_resolutions: Sequence[int],
                     channel_mult: Sequence[int]) -> tuple[nn.ModuleList, list[int]]:
        """The input blocks (conv, then ResBlocks with attention where the downsampling is in
        `attention_resolutions`, and a Downsample between levels) and the channels of each one's output."""
        blocks = nn.ModuleList([TimestepEmbedSequential(nn.Conv2d(in_channels, self.model_channels, 3, padding=1))])
        skip_chans = [self.model_channels]
        ch, ds = self.model_channels, 1
        for level, mult in enumerate(channel_mult):
            for _ in range(num_res_blocks):
                layers: list[nn.Module] = [self.resblock(ch, mult * self.model_channels)]
                ch = mult * self.model_channels
                if ds in attention_resolutions:
                    layers.append(self.attention(ch))
                blocks.append(TimestepEmbedSequential(*layers))
                skip_chans.append(ch)
            if level != len(channel_mult) - 1:
                blocks.append(TimestepEmbedSequential(Downsample(ch)))
                skip_chans.append(ch)
                ds *= 2
        return blocks, skip_chans

    def middle_block(self, ch: int) -> TimestepEmbedSequential:
        return TimestepEmbedSequential(self.resblock(ch, ch), self.attention(ch), self.resblock(ch, ch))


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
        check_sd_v1_options(
            conv_resample=conv_resample, dims=dims, num_classes=num_classes, use_fp16=use_fp16,
            num_heads_upsample=num_heads_upsample, use_scale_shift_norm=use_scale_shift_norm,
            resblock_updown=resblock_updown, use_new_attention_order=use_new_attention_order,
            use_spatial_transformer=use_spatial_transformer, n_embed=n_embed,
        )
        # `legacy` only changes head sizes of the non-spatial AttentionBlock, which SD v1 does not use; accepted as is.
        blocks = UNetBlocks(model_channels, num_heads, num_head_channels, transformer_depth, context_dim, dropout,
                            use_checkpoint)
        self.image_size = image_size
        self.in_channels = in_channels
        self.model_channels = model_channels
        self.out_channels = out_channels
        self.time_embed = blocks.time_embed()
        self.input_blocks, skip_chans = blocks.input_blocks(in_channels, num_res_blocks, attention_resolutions,
                                                            channel_mult)
        ch, ds = skip_chans[-1], 2 ** (len(channel_mult) - 1)
        self.middle_block = blocks.middle_block(ch)

        self.output_blocks = nn.ModuleList()
        for level, mult in reversed(list(enumerate(channel_mult))):
            for i in range(num_res_blocks + 1):
                layers = [blocks.resblock(ch + skip_chans.pop(), mult * model_channels)]
                ch = mult * model_channels
                if ds in attention_resolutions:
                    layers.append(blocks.attention(ch))
                if level and i == num_res_blocks:
                    layers.append(Upsample(ch))
                    ds //= 2
                self.output_blocks.append(TimestepEmbedSequential(*layers))

        self.out = nn.Sequential(
            normalization(ch), nn.SiLU(), zero_module(nn.Conv2d(model_channels, out_channels, 3, padding=1))
        )

    def forward(self, x: torch.Tensor, timesteps: torch.Tensor, context: torch.Tensor,
                control: Optional[Sequence[torch.Tensor]] = None) -> torch.Tensor:
        """Predict the noise in `x` [B, C, H, W] at `timesteps` [B] (integer or fractional) given `context`
        [B, L, context_dim]; `control` (a ControlNet's residuals: one per input block, then the middle block's) is
        added to the skip connections and to the middle block's output."""
        emb = self.time_embed(timestep_embedding(timesteps, self.model_channels).to(x.dtype))
        skips = []
        h = x
        for block in self.input_blocks:
            h = block(h, emb, context)
            skips.append(h)
        h = self.middle_block(h, emb, context)
        if control is not None:
            if len(control) != len(skips) + 1:
                raise ValueError(f"UNetModel: {len(control)} control residuals for {len(skips)} skips + the middle")
            skips = [skip + residual for skip, residual in zip(skips, control)]
            h = h + control[-1]
        for block in self.output_blocks:
            h = block(torch.cat([h, skips.pop()], dim=1), emb, context)
        return self.out(h)
