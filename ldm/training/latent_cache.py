"""Cached latents (--cache_latents): every instance and class image is encoded once by the VAE, in each flip, and
the datasets then yield the posterior's moments (mean and logvar) instead of pixels, so that a training step draws
its latents from them without running the VAE. The cache is a file per dataset in the run folder, reused while the
images, their size, crop, buckets and interpolation, and the VAE encoder's weights stay the same. With aspect
buckets the images differ in size, and the file holds one tensor per image."""
import re
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
WHAT_CHANGED = {"images": "image files", "size": "size", "crop": "crop", "buckets": "aspect buckets",
                "interpolation": "interpolation", "flips": "flips (flip_p on or off)", "vae": "VAE weights"}
Moments = torch.Tensor | list[torch.Tensor]  # [N, flips, 2C, h, w], or with buckets [flips, 2C, h, w] per image


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
    buckets = "none" if dataset.bucket_of is None else ";".join(f"{w}x{h}" for w, h in dataset.bucket_of)
    return {"images": images.hexdigest(), "size": str(dataset.size), "crop": dataset.crop, "buckets": buckets,
            "interpolation": dataset.interpolation, "flips": str(len(dataset.flips)), "vae": vae_hash}


def read_cache(path: Path, key: dict[str, str]) -> Optional[Moments]:
    """The moments saved at `path` when they were made under `key`, else None, with a log line saying why."""
    if not path.is_file():
        logger.info("%s: no latent cache yet, encoding the images once", path)
        return None
    try:
        with safe_open(str(path), framework="pt") as handle:
            saved, names = handle.metadata() or {}, list(handle.keys())
            if "moments" in names:
                moments = handle.get_tensor("moments")
            else:  # one tensor per image, moments.0, moments.1, ...
                moments = [handle.get_tensor(f"moments.{k}") for k in range(len(names))]
    except Exception as err:  # safetensors raises its own error types for a damaged header or file
        logger.warning("%s: unreadable latent cache (%s), rebuilding it", path, err)
        return None
    changed = [WHAT_CHANGED[name] for name, value in key.items() if saved.get(name) != value]
    if changed:
        logger.info("%s: rebuilding the latent cache, the %s changed", path, ", ".join(changed))
        return None
    logger.info("%s: reusing the latent cache", path)
    return moments


def save_cache(path: Path, moments: Moments, key: dict[str, str]) -> None:
    """Write the moments with their key as a .safetensors file (atomically)."""
    tensors = {"moments": moments.contiguous()} if isinstance(moments, torch.Tensor) else {
        f"moments.{k}": m.contiguous() for k, m in enumerate(moments)}
    size = sum(t.numel() * t.element_size() for t in tensors.values())
    atomic_write(path, lambda tmp: save_file(tensors, str(tmp), metadata=key), size + 4096 + 64 * len(tensors))


@torch.no_grad()
def encode_dataset(model: nn.Module, dataset: PersonalizedBase, device: torch.device, name: str) -> Moments:
    """The posterior moments of every image of `dataset` in each flip: [N images, flips, 2 * z_channels, h, w], or
    with buckets a list of [flips, 2 * z_channels, h, w], one per image (batched by size)."""
    jobs = [(k, flip) for k in range(len(dataset.paths)) for flip in dataset.flips]
    by_size: dict[tuple[int, int], list[tuple[int, bool]]] = {}
    for job in jobs:
        by_size.setdefault(dataset.target_size(job[0]), []).append(job)
    encoded: dict[tuple[int, bool], torch.Tensor] = {}
    with tqdm(total=len(jobs), desc=f"encoding the {name} images", unit="img") as progress:
        for group in by_size.values():
            for start in range(0, len(group), BATCH_SIZE):
                chunk = group[start:start + BATCH_SIZE]
                x = torch.stack([dataset.image(k, flip) for k, flip in chunk]).permute(0, 3, 1, 2).contiguous()
                encoded.update(zip(chunk, model.encode_first_stage(x.to(device)).parameters.float().cpu()))
                progress.update(len(chunk))
    per_image = [torch.stack([encoded[k, flip] for flip in dataset.flips]) for k in range(len(dataset.paths))]
    return torch.stack(per_image) if len(by_size) == 1 else per_image


def load_vae_weights(model: nn.Module, path: Path) -> None:
    """The VAE weights of a resumable checkpoint, loaded now (Lightning restores the rest when fit starts)."""
    prefix = "first_stage_model."
    state = {key[len(prefix):]: value for key, value in read_state_dict(path).items() if key.startswith(prefix)}
    model.first_stage_model.load_state_dict(state)


def cache_latents(model: nn.Module, data: DataModuleFromConfig, folder: Path, device: torch.device,
                  resume_checkpoint: Optional[Path] = None) -> None:
    """Give each dataset of `data` its moments, from `folder/latents_<dataset>.safetensors` (train, reg, or
    train_<concept>, ... with several concepts) when still valid, else encoded on `device` and saved there;
    `resume_checkpoint` is a last.ckpt whose VAE the cache must match."""
    if resume_checkpoint is not None:
        load_vae_weights(model, resume_checkpoint)
    vae_hash = vae_digest(model.first_stage_model)
    model.first_stage_model.to(device)
    for name, dataset in data.datasets().items():
        path = Path(folder) / f"latents_{re.sub(r'[^A-Za-z0-9@.-]+', '_', name)}.safetensors"
        key = cache_key(dataset, vae_hash)
        moments = read_cache(path, key)
        if moments is None:
            moments = encode_dataset(model, dataset, device, name)
            save_cache(path, moments, key)
        dataset.use_moments(moments)
    model.latents_cached = True
