"""Weights from "a file or a folder": an SD v1 .ckpt/.safetensors file or a diffusers pipeline folder, read, loaded
into a model, or exported as a weights-only file. The top of the checkpoint package: it builds on every other module
of it, and none of them comes back up here."""
import os
from pathlib import Path

import torch
from torch import nn

from ldm.checkpoint.diffusers import read_diffusers_folder
from ldm.checkpoint.files import (GROUPS, REQUIRED_GROUPS, CheckpointError, check_checkpoint_file, check_finite,
                                  group_of, read_weight_file, select_unet_weights, to_sd_layout)
from ldm.checkpoint.loading import LoadReport, load_state
from ldm.checkpoint.writing import WEIGHT_SUFFIXES, ExportReport, cast_weights, precision_names, save_weights
from ldm.util import UserError, ensure_writable_dir


def read_weights(path: str | os.PathLike) -> tuple[dict[str, torch.Tensor], list[str]]:
    """The tensors of a weight file or a diffusers folder (under SD v1 keys), and the names of the other entries
    beside a file's `state_dict` (training state)."""
    if check_checkpoint_file(path).is_dir():
        return read_diffusers_folder(path), []
    return read_weight_file(path)


def read_state_dict(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """The tensors of a .ckpt/.pt/.pth (under `state_dict` or flat) or .safetensors file, on the CPU; a diffusers
    pipeline folder's under SD v1 keys."""
    return read_weights(path)[0]


def load_model_weights(model: nn.Module, path: str | os.PathLike, use_ema: bool = False) -> LoadReport:
    """Load an SD v1 file or diffusers folder into a LatentDiffusion (see loading.load_state)."""
    return load_state(model, read_state_dict(path), path, use_ema)


def export_weights(source: str | os.PathLike, dest: str | os.PathLike, dtype: torch.dtype | None = None,
                   use_ema: bool = False) -> ExportReport:
    """Write the weights of any SD v1 file (resumable, full-EMA, weights-only) as a weights-only SD v1 file in
    `dtype` (None: as stored), with the EMA UNet in place of the UNet's if `use_ema`; EMA copies are left out."""
    source, dest = Path(source), Path(dest)
    if dest.suffix not in WEIGHT_SUFFIXES:
        raise UserError(f"{dest}: the output must end in .ckpt or .safetensors (it chooses the format)")
    if dest.exists() and dest.resolve() == source.resolve():
        raise UserError(f"{dest} is the input file; write the pruned weights to another file")
    ensure_writable_dir(dest.parent, "-o")
    state, training_state = read_weights(source)
    state = to_sd_layout(state)
    for group, prefix in GROUPS:
        if group in REQUIRED_GROUPS and not any(k.startswith(prefix) for k in state):
            raise CheckpointError(f"{source} has no {group} weights ({prefix}*); is it a full SD v1 checkpoint?")
    state = select_unet_weights(state, use_ema)
    weights = {k: v for k, v in state.items() if group_of(k) != "EMA"}
    check_finite(weights, str(source))
    tensors = cast_weights(weights, dtype)
    save_weights(tensors, dest)
    return ExportReport(path=dest, tensors=len(tensors), size=dest.stat().st_size, precision=precision_names(tensors),
                        ema=use_ema, ema_left_out=len(state) - len(weights), training_state=training_state)
