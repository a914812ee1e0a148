"""The only place that reads or writes weight files: safe .ckpt unpickling, .safetensors, SD-layout keys, atomic writes."""
import logging
import os
import pickle
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

import numpy as np
import torch
from torch import nn

logger = logging.getLogger(__name__)

UNET_PREFIX = "model.diffusion_model."
TEXT_PREFIX = "cond_stage_model.transformer."
TEXT_MODEL_PREFIX = TEXT_PREFIX + "text_model."
EMA_PREFIX = "model_ema."
GROUPS = (("UNet", UNET_PREFIX), ("VAE", "first_stage_model."), ("text encoder", "cond_stage_model."),
          ("EMA", EMA_PREFIX))
REQUIRED_GROUPS = ("UNet", "VAE", "text encoder")
IGNORED_KEYS = ("cond_stage_model.transformer.text_model.embeddings.position_ids",)


class CheckpointError(Exception):
    """A weight file that cannot be used, with a message meant for the user."""


class _ReferencedByName:
    """Stands in for classes that SD v1 files name only as dictionary keys; no code of theirs is ever run."""


# Real SD v1 files (PyTorch Lightning 1.x) name these in their callback state; nothing else is allowed.
_SAFE_GLOBALS = [
    (_ReferencedByName, "pytorch_lightning.callbacks.model_checkpoint.ModelCheckpoint"),
    (np._core.multiarray.scalar, "numpy.core.multiarray.scalar"),
    np._core.multiarray.scalar,
    np.dtype,
    type(np.dtype(np.float64)),
]


def group_of(key: str) -> str:
    """The part of the model a state-dict key belongs to."""
    return next((name for name, prefix in GROUPS if key.startswith(prefix)), "schedule")


def _read_pickle(path: Path) -> Any:
    try:
        with torch.serialization.safe_globals(_SAFE_GLOBALS):
            return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        lines = [line.strip() for line in str(err).splitlines()]
        reason = next((line for line in lines if "GLOBAL" in line or line.startswith("Unsupported global")), None)
        if reason is None:
            raise CheckpointError(f"{path}: not a checkpoint that can be read safely (not PyTorch's format, or damaged); "
                                  "is the download complete? If you trust the file, convert it to .safetensors") from None
        raise CheckpointError(
            f"{path}: refused to load, the file holds more than plain tensors ({reason}). Loading it would run "
            "code from the file. If you trust it, convert it once to .safetensors and use that file.") from None
    except (RuntimeError, EOFError, OSError) as err:
        raise CheckpointError(f"{path}: not a readable checkpoint ({err}); is the download complete?") from None


def _read_safetensors(path: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file
    try:
        return load_file(str(path), device="cpu")
    except Exception as err:  # safetensors raises its own error types for a damaged header or file
        raise CheckpointError(f"{path}: not a readable .safetensors file ({err})") from None


def read_state_dict(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """The tensors of a .ckpt/.pt/.pth (under `state_dict` or flat) or .safetensors file, on the CPU."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint not found: {path}")
    if path.suffix == ".safetensors":
        return _read_safetensors(path)
    content = _read_pickle(path)
    if isinstance(content, Mapping) and isinstance(content.get("state_dict"), Mapping):
        content = content["state_dict"]
    if not isinstance(content, Mapping):
        raise CheckpointError(f"{path}: holds a {type(content).__name__}, not a state dict")
    return {k: v for k, v in content.items() if isinstance(v, torch.Tensor)}


def to_sd_layout(state_dict: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Text-encoder keys in the SD layout (`...transformer.text_model.*`), whichever transformers wrote them."""
    result = {}
    for key, value in state_dict.items():
        if key.startswith(TEXT_PREFIX) and not key.startswith(TEXT_MODEL_PREFIX):
            key = TEXT_MODEL_PREFIX + key[len(TEXT_PREFIX):]
        if key not in IGNORED_KEYS:
            result[key] = value
    return result


def ema_key(unet_key: str) -> str:
    """LitEma's name for a UNet parameter: the path below `model.` with its dots removed."""
    return EMA_PREFIX + unet_key[len("model."):].replace(".", "")


def select_unet_weights(state_dict: dict[str, torch.Tensor], use_ema: bool) -> dict[str, torch.Tensor]:
    """With `use_ema`, replace the UNet weights by the file's EMA copy (`model_ema.*`)."""
    if not use_ema:
        return state_dict
    unet_keys = [k for k in state_dict if k.startswith(UNET_PREFIX)]
    missing = [k for k in unet_keys if ema_key(k) not in state_dict]
    if missing:
        raise CheckpointError(f"the file has no EMA weights for {len(missing)} of {len(unet_keys)} UNet tensors "
                              "(model_ema.*); load it without EMA")
    return {**state_dict, **{k: state_dict[ema_key(k)] for k in unet_keys}}


@dataclass
class LoadReport:
    """What a load matched, ignored and filled in, counted by model part."""

    loaded: Counter = field(default_factory=Counter)
    unexpected: Counter = field(default_factory=Counter)
    filled: list[str] = field(default_factory=list)

    def summary(self) -> str:
        parts = [f"{group} {n}" for group, n in sorted(self.loaded.items())]
        text = "loaded " + ", ".join(parts)
        if self.unexpected:
            text += "; ignored " + ", ".join(f"{g} {n}" for g, n in sorted(self.unexpected.items()))
        return text


def _shape_problem(key: str, found: torch.Size, expected: torch.Size) -> str:
    hint = ""
    if key.endswith("attn2.to_k.weight") and found[-1] == 1024:
        hint = " (a Stable Diffusion 2 file? this tool needs a Stable Diffusion v1 checkpoint, context 768)"
    return f"{key}: file {tuple(found)} vs model {tuple(expected)}{hint}"


def check_compatible(model_state: Mapping[str, torch.Tensor], file_state: Mapping[str, torch.Tensor],
                     source: str) -> LoadReport:
    """Refuse files that would leave a model part random or whose shapes differ; count the rest."""
    shapes = [_shape_problem(k, v.shape, model_state[k].shape)
              for k, v in file_state.items() if k in model_state and v.shape != model_state[k].shape]
    if shapes:
        raise CheckpointError(f"{source} does not match the model config in {len(shapes)} tensors, e.g. "
                              + "; ".join(shapes[:3]))
    missing = Counter(group_of(k) for k in model_state if k not in file_state)
    expected = Counter(group_of(k) for k in model_state)
    for group in REQUIRED_GROUPS:
        if missing[group]:
            which = "has no" if missing[group] == expected[group] else f"lacks {missing[group]} of {expected[group]}"
            example = next(k for k in model_state if group_of(k) == group and k not in file_state)
            raise CheckpointError(f"{source} {which} {group} weights (e.g. {example}); is it a full SD v1 checkpoint?")
    report = LoadReport(loaded=Counter(group_of(k) for k in file_state if k in model_state),
                        unexpected=Counter(group_of(k) for k in file_state if k not in model_state))
    return report


def load_model_weights(model: nn.Module, path: str | os.PathLike, use_ema: bool = False) -> LoadReport:
    """Load an SD v1 file into a LatentDiffusion; every UNet, VAE and text-encoder tensor must come from the file."""
    file_state = select_unet_weights(to_sd_layout(read_state_dict(path)), use_ema)
    model_state = model.state_dict()
    report = check_compatible(model_state, file_state, str(path))
    state = {k: v for k, v in file_state.items() if k in model_state}
    ema_sources = {ema_key(k): k for k in model_state if k.startswith(UNET_PREFIX)}
    for key, unet_key in ema_sources.items():
        if key in model_state and key not in state:  # a fresh EMA starts from the loaded weights
            state[key] = state[unet_key]
            report.filled.append(key)
    missing = [k for k in model_state if k not in state]
    model.load_state_dict(state, strict=False)
    if missing:
        logger.info("%s: kept the config's values for %d buffers (%s)", path, len(missing), ", ".join(missing[:3]))
    if report.unexpected:
        logger.warning("%s: ignored %s", path, ", ".join(f"{n} {g} tensors" for g, n in report.unexpected.items()))
    logger.info("%s: %s", path, report.summary())
    return report


def _atomic_write(path: Path, write) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        write(tmp)
        with open(tmp, "rb") as handle:
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def save_checkpoint(checkpoint: Mapping[str, Any], path: str | os.PathLike) -> None:
    """Write a Lightning-style dict (with `state_dict`) as .ckpt, through a temporary file and a rename."""
    _atomic_write(Path(path), lambda tmp: torch.save(dict(checkpoint), tmp))


def save_weights(state_dict: Mapping[str, torch.Tensor], path: str | os.PathLike, half: bool = False,
                 metadata: Mapping[str, str] | None = None) -> None:
    """Write weights only, as .safetensors or as a .ckpt with a `state_dict`; `half` stores model weights in fp16."""
    tensors = {}
    for key, value in state_dict.items():
        value = value.detach().to("cpu").contiguous()
        if half and value.is_floating_point() and group_of(key) != "schedule":
            value = value.half()
        tensors[key] = value
    path = Path(path)
    if path.suffix == ".safetensors":
        from safetensors.torch import save_file
        _atomic_write(path, lambda tmp: save_file(tensors, str(tmp), metadata=dict(metadata or {})))
    else:
        save_checkpoint({"state_dict": tensors}, path)
