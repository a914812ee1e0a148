"""Cached latents (--cache_latents): every instance and class image is encoded once by the VAE, in each flip, and
the datasets then yield the posterior's moments (mean and logvar) instead of pixels, so that a training step draws
its latents from them without running the VAE. The cache is a file per dataset in the run folder, reused while the
images, their size, crop and interpolation, and the VAE encoder's weights stay the same."""
import hashlib
import logging
from pathlib import Path
from typing import Optional

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn
from tqdm.auto import tqdm

from ldm.checkpoint import read_state_dict
from ldm.data.datamodule import DataModuleFromConfig
from ldm.data.personalized import PersonalizedBase
from ldm.util import atomic_write

logger = logging.getLogger(__name__)

BATCH_SIZE = 4
VAE_ENCODER = ("encoder.", "quant_conv.")  # the VAE weights that the moments depend on
WHAT_CHANGED = {"images": "image files", "size": "size", "crop": "crop", "interpolation": "interpolation",
                "flips": "flips (flip_p on or off)", "vae": "VAE weights"}


def file_digest(path: Path) -> str:
    """SHA-256 of a file's bytes."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def vae_digest(vae: nn.Module) -> str:
    """SHA-256 of the VAE encoder's weights (names, dtypes, shapes and values)."""
    digest = hashlib.sha256()
    for key, tensor in vae.state_dict().items():
        if key.startswith(VAE_ENCODER):
            data = tensor.detach().cpu().contiguous()
            digest.update(f"{key}:{data.dtype}:{tuple(data.shape)};".encode())
            digest.update(data.reshape(-1).view(torch.uint8).numpy())
    return digest.hexdigest()


def cache_key(dataset: PersonalizedBase, vae_hash: str) -> dict[str, str]:
    """What the moments of `dataset` depend on, as the cache file's metadata."""
    images = hashlib.sha256()
    for path in dataset.paths:
        images.update(f"{path.name}\0{file_digest(path)}\n".encode())
    return {"images": images.hexdigest(), "size": str(dataset.size), "crop": dataset.crop,
            "interpolation": dataset.interpolation, "flips": str(len(dataset.flips)), "vae": vae_hash}


def read_cache(path: Path, key: dict[str, str]) -> Optional[torch.Tensor]:
    """The moments saved at `path` when they were made under `key`, else None, with a log line saying why."""
    if not path.is_file():
        logger.info("%s: no latent cache yet, encoding the images once", path)
        return None
    try:
        with safe_open(str(path), framework="pt") as handle:
            saved, moments = handle.metadata() or {}, handle.get_tensor("moments")
    except Exception as err:  # safetensors raises its own error types for a damaged header or file
        logger.warning("%s: unreadable latent cache (%s), rebuilding it", path, err)
        return None
    changed = [WHAT_CHANGED[name] for name, value in key.items() if saved.get(name) != value]
    if changed:
        logger.info("%s: rebuilding the latent cache, the %s changed", path, ", ".join(changed))
        return None
    logger.info("%s: reusing the latent cache", path)
    return moments


def save_cache(path: Path, moments: torch.Tensor, key: dict[str, str]) -> None:
    """Write the moments with their key as a .safetensors file (atomically)."""
    moments = moments.contiguous()
    atomic_write(path, lambda tmp: save_file({"moments": moments}, str(tmp), metadata=key),
                 moments.numel() * moments.element_size() + 4096)


@torch.no_grad()
def encode_dataset(model: nn.Module, dataset: PersonalizedBase, device: torch.device, name: str) -> torch.Tensor:
    """The posterior moments [N images, flips, 2 * z_channels, h, w] of every image of `dataset` in each flip."""
    jobs = [(k, flip) for k in range(len(dataset.paths)) for flip in dataset.flips]
    moments = []
    with tqdm(total=len(jobs), desc=f"encoding the {name} images", unit="img") as progress:
        for start in range(0, len(jobs), BATCH_SIZE):
            chunk = jobs[start:start + BATCH_SIZE]
            x = torch.stack([dataset.image(k, flip) for k, flip in chunk]).permute(0, 3, 1, 2).contiguous()
            moments.append(model.encode_first_stage(x.to(device)).parameters.float().cpu())
            progress.update(len(chunk))
    return torch.cat(moments).unflatten(0, (len(dataset.paths), len(dataset.flips)))


def load_vae_weights(model: nn.Module, path: Path) -> None:
    """The VAE weights of a resumable checkpoint, loaded now (Lightning restores the rest when fit starts)."""
    prefix = "first_stage_model."
    state = {key[len(prefix):]: value for key, value in read_state_dict(path).items() if key.startswith(prefix)}
    model.first_stage_model.load_state_dict(state)


def cache_latents(model: nn.Module, data: DataModuleFromConfig, folder: Path, device: torch.device,
                  resume_checkpoint: Optional[Path] = None) -> None:
    """Give each dataset of `data` its moments, from `folder/latents_<train|reg>.safetensors` when still valid, else
    encoded on `device` and saved there; `resume_checkpoint` is a last.ckpt whose VAE the cache must match."""
    if resume_checkpoint is not None:
        load_vae_weights(model, resume_checkpoint)
    vae_hash = vae_digest(model.first_stage_model)
    model.first_stage_model.to(device)
    for name, dataset in data.datasets().items():
        path = Path(folder) / f"latents_{name}.safetensors"
        key = cache_key(dataset, vae_hash)
        moments = read_cache(path, key)
        if moments is None:
            moments = encode_dataset(model, dataset, device, name)
            save_cache(path, moments, key)
        dataset.use_moments(moments)
    model.latents_cached = True
