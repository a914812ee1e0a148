"""LoRA files at sampling time: `file.safetensors[:scale]` specs, folded into a loaded model's weights, with what
every image's metadata records of them (file name, SHA-256, scale)."""
import logging
import os
from pathlib import Path
from typing import Mapping, Sequence

from torch import nn

from ldm.checkpoint import check_checkpoint_file, read_lora
from ldm.lora.layers import merge_lora
from ldm.lora.names import LoraNames
from ldm.util import UserError, file_sha256

logger = logging.getLogger(__name__)


def parse_lora_spec(spec: str) -> tuple[str, float]:
    """`file.safetensors` (scale 1) or `file.safetensors:0.8`; a path that exists as written keeps its colons."""
    path, sep, scale = spec.rpartition(":")
    if not sep or not path or os.path.exists(spec):
        return spec, 1.0
    try:
        return path, float(scale)
    except ValueError:
        raise UserError(f"--lora {spec}: expected FILE or FILE:SCALE with a number as the scale, e.g. "
                        f"{path}:0.8") from None


def check_lora_specs(specs: Sequence[str], where: str = "--lora") -> None:
    """Refuse a missing or unreadable LoRA file (or a bad scale) before any model is loaded; `where` names the
    argument that gave it."""
    for spec in specs:
        check_checkpoint_file(parse_lora_spec(spec)[0], f"{where} takes a kohya-format .safetensors LoRA file")


def lora_names(model_config: Mapping) -> LoraNames:
    """The LoRA name map of a config's UNet (`config.model`)."""
    return LoraNames.from_unet_config(model_config["params"]["unet_config"]["params"])


def apply_lora_files(model: nn.Module, model_config: Mapping, specs: Sequence[str]) -> list[dict]:
    """Fold each LoRA file into `model`'s weights in place at its scale (files apply one after another) and return
    their metadata records `{"file", "sha256", "scale"}`; modules a file holds that we do not apply are logged."""
    if not specs:
        return []
    names, state, records = lora_names(model_config), model.state_dict(), []
    for spec in specs:
        path, scale = parse_lora_spec(spec)
        tensors, _ = read_lora(path)
        merge_lora(state, tensors, names, scale, source=Path(path).name)
        records.append({"file": Path(path).name, "sha256": file_sha256(path), "scale": scale})
    return records

