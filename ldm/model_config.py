"""The model config of a sampling run: `--config`, or the saved config of the run a checkpoint comes from; its native
image size and latent shapes; and, when a checkpoint does not fit, which of the repository's configs does."""
import logging
import os
from pathlib import Path
from typing import Mapping, Optional

import torch
from omegaconf import DictConfig, OmegaConf

from ldm.checkpoint import CheckpointError, ShapeMismatchError, check_compatible
from ldm.util import UserError, instantiate_from_config, project_path

logger = logging.getLogger(__name__)

CONFIGS = project_path("configs")
DEFAULT_CONFIG = CONFIGS / "stable-diffusion" / "v1-inference.yaml"
REQUIRED_CONFIG_KEYS = ("model.target", "model.params.channels", "model.params.unet_config.params.channel_mult",
                        "model.params.first_stage_config.params.ddconfig.ch_mult")


def shown(path: str | os.PathLike) -> str:
    """A path as the user would type it: relative to the working folder when it lies below it."""
    path = Path(path)
    return str(path.relative_to(Path.cwd())) if path.is_absolute() and path.is_relative_to(Path.cwd()) else str(path)


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
    from ldm.convert import is_diffusers_folder, sd_config_for_folder  # convert.py builds on this module
    if not config and is_diffusers_folder(ckpt):
        logger.info("using the sizes of the diffusers folder %s (pass --config to choose another)", ckpt)
        return sd_config_for_folder(Path(ckpt))
    return load_config(choose_config(config, ckpt))


def load_config(path: str) -> DictConfig:
    """The YAML model config, with a one-line error when it is missing, malformed or not an SD v1 model config."""
    if not Path(path).is_file():
        raise UserError(f"config not found: {path} (pass --config configs/stable-diffusion/v1-inference.yaml)")
    try:
        config = OmegaConf.load(path)
    except Exception as err:  # yaml and omegaconf raise many error types for a malformed file
        raise UserError(f"{path}: not a readable YAML config ({err})") from None
    for key in REQUIRED_CONFIG_KEYS:
        if OmegaConf.select(config, key) is None:
            raise UserError(f"{path}: has no {key}; is it an SD v1 model config such as v1-inference.yaml?")
    return config


def vae_factor(config: DictConfig) -> int:
    """The autoencoder's downsampling factor f, 2^(levels - 1)."""
    return 2 ** (len(config.model.params.first_stage_config.params.ddconfig.ch_mult) - 1)


def native_size(config: DictConfig) -> int:
    """The image side the model was trained at: latent image_size times f (512 for SD v1)."""
    return config.model.params.image_size * vae_factor(config)


def size_multiple(config: DictConfig) -> int:
    """Image sides must be multiples of this: f times the UNet's 2^(levels - 1) (64 for SD v1)."""
    return vae_factor(config) * 2 ** (len(config.model.params.unet_config.params.channel_mult) - 1)


def latent_shape(config: DictConfig, height: int, width: int, channels: Optional[int] = None,
                 factor: Optional[int] = None) -> tuple[int, int, int]:
    """Latent (C, H/f, W/f) for an image size, checked against the autoencoder and UNet of `config`; `channels` and
    `factor` (--C, --f) default to the config's."""
    channels = config.model.params.channels if channels is None else channels
    factor = vae_factor(config) if factor is None else factor
    if factor != vae_factor(config):
        raise UserError(f"--f {factor} does not match the autoencoder of the config (f={vae_factor(config)}); drop --f")
    if channels != config.model.params.channels:
        raise UserError(f"--C {channels} does not match the config's {config.model.params.channels} latent channels; "
                        "drop --C")
    multiple = size_multiple(config)
    for flag, size in (("--H", height), ("--W", width)):
        if size <= 0 or size % multiple:
            nearest = sorted({max(size // multiple, 1) * multiple, (size // multiple + 1) * multiple})
            raise UserError(f"{flag} {size} must be a positive multiple of {multiple} for this model "
                            f"(autoencoder x{factor}, UNet levels); try {' or '.join(map(str, nearest))}")
    return channels, height // factor, width // factor


def fitting_config(file_shapes: Mapping[str, tuple[int, ...]]) -> Optional[str]:
    """The first repository config (configs/**/v1-inference.yaml) whose model takes tensors of these shapes."""
    file_state = {key: torch.empty(shape, device="meta") for key, shape in file_shapes.items()}
    for path in sorted(CONFIGS.glob("**/v1-inference.yaml")):
        with torch.device("meta"):  # shapes only: no memory, no initialisation
            model_state = instantiate_from_config(OmegaConf.load(path).model).state_dict()
        try:
            check_compatible(model_state, file_state, str(path))
        except CheckpointError:
            continue
        return shown(path)
    return None


def with_fitting_config(err: ShapeMismatchError) -> CheckpointError:
    """`err` in one line that names the repository config that fits the file, when one does (`; try --config X`)."""
    fits = fitting_config(err.file_shapes)
    return CheckpointError(f"{err}; try --config {fits}" if fits else str(err))


def check_fits(config: DictConfig, state: Mapping[str, torch.Tensor], source: str) -> None:
    """Refuse weights that `config`'s model (built on the meta device) cannot take, as sampling does."""
    with torch.device("meta"):  # shapes only: no memory, no initialisation
        model_state = instantiate_from_config(config.model).state_dict()
    try:
        check_compatible(model_state, state, source)
    except ShapeMismatchError as err:
        raise with_fitting_config(err) from None
