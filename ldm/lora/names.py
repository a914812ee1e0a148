"""The one name map of LoRA files: our CompVis module names <-> kohya's (`lora_unet_<diffusers path>`, `lora_te_...`).

kohya's sd-scripts name a UNet module by its diffusers path with `_` for `.`; files from other tools use our CompVis
path instead (`lora_unet_input_blocks_1_1_...`), and both are read. Text-encoder names always keep `text_model`
(`lora_te_text_model_encoder_layers_0_self_attn_q_proj`), as A1111 and ComfyUI expect."""
import re
from typing import Iterable, Mapping, Optional, Sequence

UNET = "model.diffusion_model."
TEXT = "cond_stage_model.transformer."  # our TextTransformer keeps CLIP's `text_model.` level below it
TEXT_LAYERS = TEXT + "text_model.encoder.layers."
# Inside a SpatialTransformer: what `attention` targets, and every Linear and 1x1 conv (`transformer`, kohya's set).
ATTENTION = r"transformer_blocks\.\d+\.attn[12]\.(to_q|to_k|to_v|to_out\.0)"
TARGETS = {
    "attention": re.compile(ATTENTION),
    "transformer": re.compile(rf"proj_in|proj_out|{ATTENTION}|transformer_blocks\.\d+\.ff\.net\.(0\.proj|2)"),
}
TEXT_TARGET = re.compile(r"(\d+)\.(self_attn\.(q|k|v|out)_proj|mlp\.fc[12])")  # group 1: the layer
UNET_BLOCK = re.compile(r"((?:input_blocks|output_blocks)\.\d+\.1|middle_block\.1)\.(.+)")
# A ResBlock's 3x3 convs (LoCon's, `--conv` of extract_lora.py): CompVis path -> diffusers name.
RESNET_CONVS = {"in_layers.2": "conv1", "out_layers.3": "conv2"}
RESNET_CONV = re.compile(r"((?:input_blocks|output_blocks)\.\d+\.0|middle_block\.[02])\.(in_layers\.2|out_layers\.3)")


def unet_block_map(channel_mult: Sequence[int], num_res_blocks: int,
                   attention_resolutions: Sequence[int]) -> dict[str, str]:
    """CompVis path of every SpatialTransformer -> its diffusers path, walking the levels as UNetModel builds them."""
    blocks, index, ds = {}, 1, 1
    for level in range(len(channel_mult)):
        for j in range(num_res_blocks):
            if ds in attention_resolutions:
                blocks[f"input_blocks.{index}.1"] = f"down_blocks.{level}.attentions.{j}"
            index += 1
        if level != len(channel_mult) - 1:
            index, ds = index + 1, ds * 2  # the Downsample block
    blocks["middle_block.1"] = "mid_block.attentions.0"
    index = 0
    for up in range(len(channel_mult)):
        for j in range(num_res_blocks + 1):
            if ds in attention_resolutions:
                blocks[f"output_blocks.{index}.1"] = f"up_blocks.{up}.attentions.{j}"
            index += 1
        ds //= 2
    return blocks


def unet_resnet_map(channel_mult: Sequence[int], num_res_blocks: int) -> dict[str, str]:
    """CompVis path of every ResBlock -> its diffusers path (`input_blocks.1.0` -> `down_blocks.0.resnets.0`)."""
    blocks, index, levels = {}, 1, len(channel_mult)
    for level in range(levels):
        for j in range(num_res_blocks):
            blocks[f"input_blocks.{index}.0"] = f"down_blocks.{level}.resnets.{j}"
            index += 1
        index += level != levels - 1  # the Downsample block
    blocks["middle_block.0"], blocks["middle_block.2"] = "mid_block.resnets.0", "mid_block.resnets.1"
    for up in range(levels):
        for j in range(num_res_blocks + 1):
            blocks[f"output_blocks.{up * (num_res_blocks + 1) + j}.0"] = f"up_blocks.{up}.resnets.{j}"
    return blocks


class LoraNames:
    """Our module names (inside a LatentDiffusion) <-> kohya names, for one SD v1 UNet config."""

    def __init__(self, channel_mult: Sequence[int], num_res_blocks: int, attention_resolutions: Sequence[int]):
        self.blocks = unet_block_map(channel_mult, num_res_blocks, attention_resolutions)
        self.resnets = unet_resnet_map(channel_mult, num_res_blocks)

    @classmethod
    def from_unet_config(cls, params: Mapping) -> "LoraNames":
        """From a config's `model.params.unet_config.params`."""
        return cls(list(params["channel_mult"]), int(params["num_res_blocks"]), list(params["attention_resolutions"]))

    def targets(self, module_names: Iterable[str], targets: str = "transformer", text_encoder: bool = False,
                text_layers: Optional[int] = None) -> list[str]:
        """Which of `module_names` (a LatentDiffusion's) a target set covers: `attention` or `transformer` in the
        UNet, plus the text encoder's attention and MLP Linears if `text_encoder`, in its first `text_layers` layers
        (all when None; with clip_skip the later ones never reach the conditioning)."""
        if targets not in TARGETS:
            raise ValueError(f"LoRA targets {targets!r}: use one of {', '.join(TARGETS)}")
        return [name for name in module_names if self._inner(name, TARGETS[targets])
                or (text_encoder and self._text_target(name, text_layers))]

    @staticmethod
    def _text_target(name: str, text_layers: Optional[int]) -> bool:
        """Whether `name` is a text encoder Linear that LoRA targets, in one of the first `text_layers` layers."""
        match = TEXT_TARGET.fullmatch(name[len(TEXT_LAYERS):]) if name.startswith(TEXT_LAYERS) else None
        return bool(match) and (text_layers is None or int(match[1]) < text_layers)

    def _inner(self, name: str, leaf: re.Pattern) -> bool:
        """Whether `name` is a module of a UNet SpatialTransformer whose path below it matches `leaf`."""
        match = UNET_BLOCK.fullmatch(name[len(UNET):]) if name.startswith(UNET) else None
        return bool(match) and match[1] in self.blocks and bool(leaf.fullmatch(match[2]))

    def resnet_convs(self, module_names: Iterable[str]) -> list[str]:
        """Which of `module_names` are the 3x3 convs of a UNet ResBlock (LoCon's extra modules)."""
        return [name for name in module_names if self._resnet_conv(name)]

    def _resnet_conv(self, name: str) -> Optional[re.Match]:
        """The match (block, conv) of a UNet ResBlock's 3x3 conv, or None."""
        match = RESNET_CONV.fullmatch(name[len(UNET):]) if name.startswith(UNET) else None
        return match if match and match[1] in self.resnets else None

    def kohya(self, name: str) -> str:
        """kohya's name of one of our target modules: `lora_unet_down_blocks_0_...` or `lora_te_text_model_...`."""
        if self._inner(name, TARGETS["transformer"]):
            block, inner = UNET_BLOCK.fullmatch(name[len(UNET):]).groups()
            return "lora_unet_" + f"{self.blocks[block]}.{inner}".replace(".", "_")
        conv = self._resnet_conv(name)
        if conv:
            return "lora_unet_" + f"{self.resnets[conv[1]]}.{RESNET_CONVS[conv[2]]}".replace(".", "_")
        if self._text_target(name, None):
            return "lora_te_" + name[len(TEXT):].replace(".", "_")
        raise ValueError(f"{name} is not a module that LoRA files name (a UNet transformer's or ResBlock's 3x3 conv, "
                         "or the text encoder's)")

    def lookup(self, module_names: Iterable[str]) -> dict[str, str]:
        """File name -> our module name, for each of `module_names` that has one, in every naming style we read:
        kohya's, our CompVis path with `_` (`lora_unet_input_blocks_1_1_...`), and text-encoder names without
        `text_model` (written by tools on transformers 5; read, never written)."""
        table = {}
        for name in module_names:
            try:
                kohya = self.kohya(name)
            except ValueError:
                continue
            table[kohya] = name
            if kohya.startswith("lora_unet_"):
                table["lora_unet_" + name[len(UNET):].replace(".", "_")] = name
            else:
                table[kohya.replace("lora_te_text_model_", "lora_te_")] = name
        return table
