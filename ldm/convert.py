"""Our Stable Diffusion v1 configs in diffusers' terms (the one place for diffusers-side names and conventions)."""
from typing import Any, Mapping


def diffusers_unet_config(params: Mapping[str, Any]) -> dict[str, Any]:
    """UNet2DConditionModel arguments equivalent to our UNetModel `params` (SD v1 conventions)."""
    mult = params["channel_mult"]
    attn = [2 ** level in params["attention_resolutions"] for level in range(len(mult))]
    return dict(sample_size=params["image_size"], in_channels=params["in_channels"],
                out_channels=params["out_channels"],
                down_block_types=["CrossAttnDownBlock2D" if a else "DownBlock2D" for a in attn],
                up_block_types=["CrossAttnUpBlock2D" if a else "UpBlock2D" for a in reversed(attn)],
                block_out_channels=[params["model_channels"] * m for m in mult],
                layers_per_block=params["num_res_blocks"],
                transformer_layers_per_block=params.get("transformer_depth", 1),
                cross_attention_dim=params["context_dim"],
                attention_head_dim=params["num_heads"],  # SD v1 quirk: diffusers reads this as the number of heads
                norm_num_groups=32, flip_sin_to_cos=True, freq_shift=0)
