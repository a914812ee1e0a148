"""Loading a sampling model: the device, the precision of its weights and of autocast, the model config a checkpoint
samples with (`--config`, its training run's, a diffusers folder's own, or SD v1's), and the model with its weights."""
import contextlib
import logging
import os
from pathlib import Path
from typing import ContextManager, Optional

import torch
from omegaconf import DictConfig, OmegaConf
from torch import nn

from ldm.checkpoint import ShapeMismatchError, check_checkpoint_file, load_model_weights, parameters_on_meta
from ldm.checkpoint.diffusers import is_diffusers_folder, sd_config_for_folder
from ldm.checkpoint.fitting import with_fitting_config
from ldm.config import DEFAULT_CONFIG, load_config, shown
from ldm.inference.precision import cuda_has_bf16, gpu_name
from ldm.util import UserError, instantiate_from_config

logger = logging.getLogger(__name__)


def choose_device(name: str) -> torch.device:
    """`auto` picks CUDA, then Apple MPS, then the CPU; asking for a missing one is an error."""
    has_mps = torch.backends.mps.is_available()
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "mps" if has_mps else "cpu"
    if name == "cuda" and not torch.cuda.is_available():
        raise UserError(f"--device cuda: PyTorch {torch.__version__} sees no CUDA GPU; use --device auto or cpu")
    if name == "mps" and not has_mps:
        raise UserError("--device mps: Apple MPS is not available here; use --device auto or cpu")
    return torch.device(name)


def precision_scope(precision: str, device: torch.device) -> ContextManager:
    """Mixed-precision autocast for `precision`, or nothing for full precision."""
    if precision == "full" or (precision == "autocast" and device.type == "cpu"):
        return contextlib.nullcontext()
    if precision == "bf16" and device.type == "cuda" and not cuda_has_bf16(device):
        raise UserError(f"--precision bf16: this GPU ({gpu_name(device)}) has no native bfloat16; use --precision "
                        "autocast")
    return torch.autocast(device.type, dtype=torch.bfloat16 if precision == "bf16" else torch.float16)


def weights_dtype(precision: str, device: torch.device) -> torch.dtype:
    """The dtype of a sampling model's weights: float16 under autocast on a CUDA GPU, bfloat16 with --precision
    bf16, else float32 (--precision full, and autocast elsewhere)."""
    if precision == "bf16":
        return torch.bfloat16
    return torch.float16 if precision == "autocast" and device.type == "cuda" else torch.float32


def load_model(config: DictConfig, ckpt_path: str, device: torch.device, use_ema: bool = False,
               precision: str = "full", flag: str = "--ckpt") -> nn.Module:
    """A LatentDiffusion built from `config`, with the weights of `ckpt_path` (its EMA UNet with `use_ema`), in eval
    mode on `device`; the UNet, VAE and text encoder hold their weights at `weights_dtype(precision, device)`, the
    noise schedule stays float32; `flag` is the option that named the file. A run config's `use_ema` only says how
    it trained: the sampling model holds one set of weights."""
    check_checkpoint(ckpt_path, flag)
    if OmegaConf.select(config, "model.params.use_ema"):
        config = OmegaConf.merge(config, {"model": {"params": {"use_ema": False}}})
    try:
        with parameters_on_meta():  # the file fills them: no random init, one copy of the weights
            model = instantiate_from_config(config.model)
    except (KeyError, TypeError, ValueError, ImportError) as err:
        raise UserError(f"cannot build the model from the config: {err}") from None
    dtype = weights_dtype(precision, device)
    for part in (model.model, model.first_stage_model, model.cond_stage_model):
        part.to(dtype)  # still on meta: the file's tensors load at this dtype
    try:
        load_model_weights(model, ckpt_path, use_ema=use_ema)
    except ShapeMismatchError as err:
        raise with_fitting_config(err) from None
    return model.eval().requires_grad_(False).to(device)


def check_checkpoint(ckpt_path: str, flag: str = "--ckpt") -> None:
    """Refuse a checkpoint (named by `flag`) that is missing, unreadable, a folder or not a weight file, before any
    model is built."""
    check_checkpoint_file(ckpt_path, f"pass {flag} path/to/sd-v1-x.ckpt or .safetensors")


def run_config(ckpt: str | os.PathLike) -> Optional[Path]:
    """The newest saved project config of the training run that wrote `ckpt` (`<run>/checkpoints/<x>.ckpt`)."""
    path = Path(ckpt)
    if path.parent.name != "checkpoints":
        return None
    configs = sorted((path.parent.parent / "configs").glob("*-project.yaml"))
    return configs[-1] if configs else None


def choose_config(config: Optional[str], ckpt: str) -> str:
    """`--config` when given, else the checkpoint's run config, else the SD v1 inference config."""
    if config:
        return config
    saved = run_config(ckpt)
    if saved is not None:
        logger.info("using the config that trained %s: %s (pass --config to choose another)", ckpt, saved)
        return str(saved)
    return shown(DEFAULT_CONFIG)


def sampling_config(config: Optional[str], ckpt: str) -> DictConfig:
    """The model config to sample `ckpt` with (see choose_config); a diffusers folder without --config brings its
    own (our config with the sizes of its part configs)."""
    if not config and is_diffusers_folder(ckpt):
        logger.info("using the sizes of the diffusers folder %s (pass --config to choose another)", ckpt)
        return sd_config_for_folder(Path(ckpt))
    return load_config(choose_config(config, ckpt))
