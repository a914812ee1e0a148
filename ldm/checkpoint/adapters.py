"""LoRA (kohya's format) and ControlNet files."""
import logging
import os
from pathlib import Path
from typing import Mapping

import torch
from torch import nn

from ldm.checkpoint.files import (LORA_PREFIXES, REQUIRED_GROUPS, CheckpointError, check_checkpoint_file, check_finite,
                                  group_of, read_weight_file)
from ldm.checkpoint.loading import on_meta
from ldm.checkpoint.writing import save_weights
from ldm.util import UserError

logger = logging.getLogger(__name__)


def _lora_dim(tensors: Mapping[str, torch.Tensor], suffix: str) -> str:
    """kohya's metadata value for the rank (`lora_down.weight` rows) or alpha: one number, or "Dynamic" if mixed."""
    values = {float(v) if suffix == "alpha" else v.shape[0] for k, v in tensors.items() if k.endswith("." + suffix)}
    if not values and suffix == "alpha":  # no alphas: each is its module's rank
        return _lora_dim(tensors, "lora_down.weight")
    return str(values.pop()) if len(values) == 1 else "Dynamic"


def save_lora(tensors: Mapping[str, torch.Tensor], path: str | os.PathLike, base_hash: str,
              metadata: Mapping[str, str] | None = None, dtype: torch.dtype | None = None) -> None:
    """Write kohya-format LoRA tensors as .safetensors (atomically), with kohya's metadata (`ss_network_module`,
    `ss_network_dim`, `ss_network_alpha`: the file's, unless `metadata` gives them) and the SHA-256 of the base
    checkpoint (`ss_new_sd_model_hash`)."""
    path = Path(path)
    if path.suffix != ".safetensors":
        raise UserError(f"{path}: a LoRA file is written as .safetensors (what other SD tools read)")
    bad = next((k for k in tensors if not k.startswith(LORA_PREFIXES)), None)
    if bad or not tensors:
        raise ValueError(f"not kohya LoRA tensors (e.g. {bad!r}): names start with {', '.join(LORA_PREFIXES)}")
    info = {"ss_network_dim": _lora_dim(tensors, "lora_down.weight"), "ss_network_alpha": _lora_dim(tensors, "alpha"),
            **(metadata or {}), "ss_network_module": "networks.lora", "ss_new_sd_model_hash": base_hash}
    save_weights(tensors, path, metadata=info, dtype=dtype)


def _safetensors_metadata(path: Path) -> dict[str, str]:
    from safetensors import safe_open
    with safe_open(str(path), framework="pt") as handle:
        return dict(handle.metadata() or {})


def _not_a_lora(path: Path, tensors: Mapping[str, torch.Tensor]) -> str:
    """Why a file whose tensors have no kohya LoRA name is not a LoRA file, for the user."""
    groups = {group_of(k) for k in tensors}
    if set(REQUIRED_GROUPS) <= groups:
        return f"{path} is a full SD v1 checkpoint, not a LoRA file: pass it as the base checkpoint (--ckpt)"
    example = next(iter(tensors), None)
    if any(".lora_A." in key and group_of(key) in REQUIRED_GROUPS for key in tensors):  # our LoRA run's last.ckpt
        return (f"{path} is a LoRA run's resumable checkpoint, not its LoRA file: pass "
                f"{path.with_suffix('.safetensors')}, written beside it (kohya format, as other SD tools read it)")
    if example and "lora" in example.lower():
        return (f"{path} is a LoRA in another format (keys like {example}); this tool reads kohya-format files "
                "(keys lora_unet_*, lora_te_*), which A1111, ComfyUI and kohya's sd-scripts write")
    return f"{path} is not a LoRA file: none of its {len(tensors)} tensors is named lora_unet_* or lora_te_*"


def read_lora(path: str | os.PathLike) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """The tensors (as stored: fp32, fp16 or bf16) and metadata of a kohya-format LoRA file (.safetensors, or an
    old .pt/.ckpt read by the safe unpickler, which has no metadata)."""
    path = check_checkpoint_file(path)
    tensors = read_weight_file(path)[0]
    if not any(k.startswith(LORA_PREFIXES) for k in tensors):
        raise CheckpointError(_not_a_lora(path, tensors))
    check_finite(tensors, str(path))
    return tensors, _safetensors_metadata(path) if path.suffix == ".safetensors" else {}


CONTROL_PREFIX = "control_model."  # lllyasviel's files; some carry a whole SD model beside it


def read_controlnet(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """The tensors of an original-layout SD 1.5 ControlNet file (.pth/.ckpt read by the safe unpickler, or
    .safetensors), keyed as the ControlNet module's state dict (without `control_model.`)."""
    path = check_checkpoint_file(path, "pass --controlnet path/to/control_v11p_sd15_canny.pth or .safetensors")
    tensors = read_weight_file(path)[0]
    if any(k.startswith(CONTROL_PREFIX) for k in tensors):
        others = sum(not k.startswith(CONTROL_PREFIX) for k in tensors)
        if others:
            logger.info("%s: ignored %d tensors outside %s (the SD model it was trained on)", path, others,
                        CONTROL_PREFIX)
        tensors = {k[len(CONTROL_PREFIX):]: v for k, v in tensors.items() if k.startswith(CONTROL_PREFIX)}
    if "controlnet_cond_embedding.conv_in.weight" in tensors:
        raise CheckpointError(f"{path} is a diffusers-format ControlNet; this tool reads the original files "
                              "(control_v11p_sd15_*.pth or their .safetensors, keys control_model.*)")
    if "input_hint_block.0.weight" not in tensors:
        if any(k.startswith(LORA_PREFIXES) for k in tensors) or set(REQUIRED_GROUPS) <= {group_of(k) for k in tensors}:
            raise CheckpointError(f"{path} is not a ControlNet file but an SD model or a LoRA; pass it with --ckpt "
                                  "or --lora, and a ControlNet with --controlnet")
        raise CheckpointError(f"{path} is not a ControlNet file: it has no input_hint_block (keys like "
                              f"{next(iter(tensors), 'none')})")
    context = tensors.get("input_blocks.1.1.transformer_blocks.0.attn2.to_k.weight")
    if context is not None and context.shape[-1] == 1024:
        raise CheckpointError(f"{path} is a ControlNet for Stable Diffusion 2 (context 1024); SD v1 models need an "
                              "SD 1.5 ControlNet (context 768)")
    check_finite(tensors, str(path))
    return tensors


def load_controlnet_weights(net: nn.Module, path: str | os.PathLike) -> None:
    """Fill a ControlNet (built on the `meta` device or not) from an original-layout file; a missing part or a
    shape that differs is an error, never a silently random part."""
    tensors, expected = read_controlnet(path), net.state_dict()
    missing = [k for k in expected if k not in tensors]
    if missing:
        parts = sorted({k.split(".")[0] for k in missing})
        raise CheckpointError(f"{path} lacks {len(missing)} of the ControlNet's {len(expected)} tensors (in "
                              f"{', '.join(parts)}; e.g. {missing[0]}); is it a complete SD 1.5 ControlNet?")
    shapes = [f"{k}: file {tuple(tensors[k].shape)} vs model {tuple(v.shape)}"
              for k, v in expected.items() if tensors[k].shape != v.shape]
    if shapes:
        raise CheckpointError(f"{path} does not fit this model's UNet in {len(shapes)} tensors (a ControlNet for "
                              f"another model?), e.g. " + "; ".join(shapes[:2]))
    extra = [k for k in tensors if k not in expected]
    if extra:
        raise CheckpointError(f"{path} has {len(extra)} tensors this model's ControlNet does not (e.g. {extra[0]}): "
                              "a ControlNet for another UNet?")
    net.load_state_dict({k: tensors[k].to(v.dtype) for k, v in expected.items()}, assign=bool(on_meta(net)))
