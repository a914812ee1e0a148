"""Reading weight files: safe .ckpt unpickling, .safetensors, diffusers folders, SD-layout keys, EMA selection."""
import os
import pickle
import re
from pathlib import Path
from typing import Any, Mapping

import numpy as np
import torch

from ldm.modules.diffusionmodules.schedule import SCHEDULE_BUFFERS
from ldm.util import UserError

UNET_PREFIX = "model.diffusion_model."
TEXT_PREFIX = "cond_stage_model.transformer."
TEXT_MODEL_PREFIX = TEXT_PREFIX + "text_model."
EMA_PREFIX = "model_ema."
GROUPS = (("UNet", UNET_PREFIX), ("VAE", "first_stage_model."), ("text encoder", "cond_stage_model."),
          ("EMA", EMA_PREFIX))
REQUIRED_GROUPS = ("UNet", "VAE", "text encoder")
LORA_PREFIXES = ("lora_unet_", "lora_te_", "lora_te1_", "lora_te2_")  # kohya's; te1/te2 are SDXL's
# A peft adapter weight in an injected model's state dict, of any network kind (`...to_q.lora_A.default.weight`,
# DoRA's `lora_magnitude_vector`, LoHa's `...hada_w1_a.default`, LoKr's `lokr_w1`...), as a LoRA run's last.ckpt
# holds them.
ADAPTER_KEY = re.compile(r"\.(lora_A|lora_B|lora_magnitude_vector|hada_w[12]_[ab]|lokr_w[12](_[ab])?)\.")
IGNORED_KEYS = ("cond_stage_model.transformer.text_model.embeddings.position_ids",)


class CheckpointError(UserError):
    """A weight file that cannot be used, with a message meant for the user."""


class ShapeMismatchError(CheckpointError):
    """A file whose tensors have other shapes than the model config's; `file_shapes` lets callers look for one
    that fits."""

    def __init__(self, message: str, file_shapes: Mapping[str, tuple[int, ...]]):
        super().__init__(message)
        self.file_shapes = dict(file_shapes)


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
    """The part of the model a state-dict key belongs to: a model part, "noise schedule" or "other"."""
    if key in SCHEDULE_BUFFERS:
        return "noise schedule"
    return next((name for name, prefix in GROUPS if key.startswith(prefix)), "other")


CONTROL_BYTES = frozenset(range(32)) - {9, 10, 13}  # never in text; every weight format starts with some


def _not_a_checkpoint(head: bytes) -> str | None:
    """Why a file that starts as text or holds nothing cannot be a checkpoint (a failed download), else None."""
    if not head:
        return "is empty (0 bytes): a failed download? Download it again"
    if CONTROL_BYTES.intersection(head):
        return None
    text = head.decode("utf-8", errors="replace")
    first = text.strip().splitlines()[0][:60] if text.strip() else ""
    if text.startswith("version https://git-lfs"):
        return "is a Git LFS pointer (a small text file), not the weights: fetch them with `git lfs pull`"
    if "<html" in text.lower() or text.lower().lstrip().startswith("<!doctype"):
        return (f"is not a checkpoint but a web page (it begins '{first}'): a failed download, or a login or error "
                "page saved in its place? Download the file again")
    return f"is not a checkpoint but a text file (it begins '{first}'): a failed download? Download it again"


def check_checkpoint_file(path: str | os.PathLike, hint: str = "") -> Path:
    """Refuse, with one line, a path that cannot be a weight file: missing, a folder (but a diffusers pipeline
    folder), empty, text or HTML."""
    path, hint = Path(path), f" ({hint})" if hint else ""
    if path.is_dir():
        if (path / "model_index.json").is_file():
            return path  # a diffusers pipeline folder, converted as it is read
        inside = sorted(p.name for p in path.iterdir() if p.suffix in (".ckpt", ".safetensors"))
        found = f"; it holds {', '.join(inside[:3])}: pass one of them" if inside else ""
        raise CheckpointError(f"{path} is a folder, not a checkpoint file{found}")
    if not path.is_file():
        raise CheckpointError(f"checkpoint not found: {path}{hint}")
    try:
        with open(path, "rb") as handle:
            reason = _not_a_checkpoint(handle.read(512))
    except OSError as err:
        raise CheckpointError(f"checkpoint not readable: {path} ({err.strerror}; check its permissions)") from None
    if reason:
        raise CheckpointError(f"{path} {reason}")
    return path


def is_finite(value: torch.Tensor) -> bool:
    """Whether a floating tensor holds no NaN or inf, from its min and max (a NaN gives NaN for both): one reduction,
    without a mask of the tensor's size (0.2 s instead of 4.4 s over the full-size model on the 2-core CPU)."""
    if value.numel() == 0:
        return True
    if value.element_size() == 1:  # the float8 types have no aminmax
        value = value.float()
    low, high = torch.aminmax(value)
    return bool(torch.isfinite(low)) and bool(torch.isfinite(high))


def check_finite(state: Mapping[str, torch.Tensor], source: str) -> None:
    """Refuse weights holding NaN or inf, naming the first such tensor (one pass over the floating tensors)."""
    for key, value in state.items():
        if value.is_floating_point() and not is_finite(value):
            bad = int((~torch.isfinite(value)).sum())
            raise CheckpointError(f"{source}: tensor {key} holds {bad} NaN or inf values (of {value.numel()}); the "
                                  "file comes from a run that diverged, or is damaged: use an earlier checkpoint")


def _load_pickle(path: Path) -> Any:
    """torch.load with the allow-list, memory-mapped where the file's format allows it: tensors that are never used
    (the EMA copy of a full-EMA file, optimizer state) are then never read into memory."""
    with torch.serialization.safe_globals(_SAFE_GLOBALS):
        try:
            return torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        except RuntimeError as err:
            if "mmap" not in str(err):
                raise
            return torch.load(path, map_location="cpu", weights_only=True)  # a legacy (pre-zip) file


def _read_pickle(path: Path) -> Any:
    try:
        return _load_pickle(path)
    except pickle.UnpicklingError as err:
        lines = [line.strip() for line in str(err).splitlines()]
        reason = next((line for line in lines if "GLOBAL" in line or line.startswith("Unsupported global")), None)
        if reason is None:
            raise CheckpointError(f"{path}: not a checkpoint that can be read safely (not PyTorch's format, or "
                                  "damaged); is the download complete? If you trust the file, convert it to "
                                  ".safetensors") from None
        raise CheckpointError(
            f"{path}: refused to load, the file holds more than plain tensors ({reason}). Loading it would run "
            "code from the file. If you trust it, convert it once to .safetensors and use that file.") from None
    except (RuntimeError, EOFError, OSError, IndexError, ValueError) as err:
        raise CheckpointError(f"{path}: not a readable checkpoint ({err}); is the download complete?") from None


def _read_safetensors(path: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file
    try:
        return load_file(str(path), device="cpu")
    except Exception as err:  # safetensors raises its own error types for a damaged header or file
        raise CheckpointError(f"{path}: not a readable .safetensors file ({err})") from None


def read_weight_file(path: str | os.PathLike) -> tuple[dict[str, torch.Tensor], list[str]]:
    """The tensors of a weight file, and the names of the other entries beside its `state_dict` (training state)."""
    path = check_checkpoint_file(path)
    if path.suffix == ".safetensors":
        return _read_safetensors(path), []
    content, others = _read_pickle(path), []
    if isinstance(content, Mapping) and isinstance(content.get("state_dict"), Mapping):
        others = [str(k) for k in content if k != "state_dict"]
        content = content["state_dict"]
    if not isinstance(content, Mapping):
        raise CheckpointError(f"{path}: holds a {type(content).__name__}, not a state dict")
    return {k: v for k, v in content.items() if isinstance(v, torch.Tensor)}, others


def read_checkpoint(path: str | os.PathLike) -> dict[str, Any]:
    """A whole .ckpt (weights and training state such as optimizer moments), read as safely as any other file."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint not found: {path}")
    content = _read_pickle(path)
    if not isinstance(content, dict):
        raise CheckpointError(f"{path}: holds a {type(content).__name__}, not a checkpoint dictionary")
    return content


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
