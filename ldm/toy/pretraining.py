"""Pretraining of the toy world's base model (the demo's Stable Diffusion stand-in): first the VAE on world renders,
then the UNet and the text encoder together on captioned scenes whose latents are computed once and cached."""
import logging
import math
import time
from dataclasses import asdict
from typing import Callable, Optional, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ldm.modules.ema import LitEma
from ldm.optim.factory import adamw
from ldm.toy.world import Scene, random_caption, random_scene, render

logger = logging.getLogger(__name__)


def to_tensor(images: Sequence[np.ndarray]) -> Tensor:
    """uint8 [H, W, 3] arrays -> float [B, 3, H, W] in [-1, 1]."""
    return torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2).float() / 127.5 - 1.0


def random_scenes(count: int, seed: int) -> list[Scene]:
    """`count` pretraining scenes drawn with `seed` (never the subject's look)."""
    rng = np.random.default_rng(seed)
    return [random_scene(rng) for _ in range(count)]


def render_all(scenes: Sequence[Scene], side: int = 64) -> Tensor:
    return to_tensor([render(scene, side) for scene in scenes])


def random_crops(images: Tensor, size: int, generator: torch.Generator) -> Tensor:
    """One random `size` x `size` crop of each image, flipped left-right half of the time."""
    side = images.shape[-1]
    corners = torch.randint(0, side - size + 1, (images.shape[0], 2), generator=generator)
    crops = torch.stack([image[:, y:y + size, x:x + size] for image, (y, x) in zip(images, corners.tolist())])
    flip = torch.rand(images.shape[0], generator=generator) < 0.5
    crops[flip] = crops[flip].flip(-1)
    return crops


def autoencoder_loss(vae: nn.Module, x: Tensor, kl_weight: float) -> tuple[Tensor, Tensor]:
    """L1 + 0.5 MSE reconstruction plus `kl_weight` x the mean KL per latent element; returns (loss, MSE)."""
    posterior = vae.encode(x)
    reconstruction = vae.decode(posterior.sample())
    mse = F.mse_loss(reconstruction, x)
    kl = posterior.kl().mean() / posterior.mean[0].numel()
    return F.l1_loss(reconstruction, x) + 0.5 * mse + kl_weight * kl, mse


def cosine_lr(step: int, total: int, base: float, warmup: int = 0) -> float:
    """Linear warm-up, then cosine decay to 10 % of `base` at `total` steps."""
    if step < warmup:
        return base * (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return base * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress)))


def psnr(vae: nn.Module, images: Tensor, batch_size: int = 64) -> float:
    """Mean PSNR (dB) of the VAE's reconstructions (posterior mean) of `images` in [-1, 1]."""
    values = []
    with torch.no_grad():
        for start in range(0, len(images), batch_size):
            x = images[start:start + batch_size]
            mse = (vae.decode(vae.encode(x).mode()).clamp(-1, 1) - x).pow(2).flatten(1).mean(1) / 4  # on [0, 1]
            values.append(10 * torch.log10(1 / mse))
    return float(torch.cat(values).mean())


def train_vae(vae: nn.Module, images: Tensor, steps: int, batch_size: int = 16, crop: int = 32, lr: float = 5e-4,
              kl_weight: float = 2.5e-4, seed: int = 0, log_every: int = 500) -> None:
    """Train the autoencoder on random crops of `images` (it is fully convolutional, so crops train it faster)."""
    generator = torch.Generator().manual_seed(seed)
    optimizer = torch.optim.AdamW(vae.parameters(), lr=lr, weight_decay=0.0)
    vae.train()
    started = time.monotonic()
    for step in range(steps):
        for group in optimizer.param_groups:
            group["lr"] = cosine_lr(step, steps, lr, warmup=min(200, steps // 5))
        batch = images[torch.randint(0, len(images), (batch_size,), generator=generator)]
        loss, mse = autoencoder_loss(vae, random_crops(batch, crop, generator), kl_weight)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        if (step + 1) % log_every == 0:
            logger.info("vae step %d/%d: loss %.4f, mse %.4f, %.2f s/step", step + 1, steps, loss.item(), mse.item(),
                        (time.monotonic() - started) / (step + 1))
    vae.eval()


class SceneLatents:
    """Cached VAE posteriors (mean, std) of scenes, drawn as latent samples with fresh random captions."""

    def __init__(self, scenes: Sequence[Scene], mean: Tensor, std: Tensor, caption_dropout: float = 0.1):
        self.scenes, self.mean, self.std = list(scenes), mean, std
        self.caption_dropout = caption_dropout

    @classmethod
    def encode(cls, vae: nn.Module, scenes: Sequence[Scene], batch_size: int = 128, **kwargs) -> "SceneLatents":
        """Render and encode every scene once."""
        means, stds = [], []
        with torch.no_grad():
            for start in range(0, len(scenes), batch_size):
                posterior = vae.encode(render_all(scenes[start:start + batch_size]))
                means.append(posterior.mean.half())
                stds.append(posterior.std.half())
        return cls(scenes, torch.cat(means), torch.cat(stds), **kwargs)

    def to_arrays(self) -> dict[str, np.ndarray]:
        return {"mean": self.mean.numpy(), "std": self.std.numpy()}

    def scene_dicts(self) -> list[dict]:
        return [asdict(scene) for scene in self.scenes]

    @classmethod
    def from_arrays(cls, arrays: dict[str, np.ndarray], scenes: Sequence[dict], **kwargs) -> "SceneLatents":
        scene_list = [Scene(**{**s, "colours": tuple(s["colours"])}) for s in scenes]
        return cls(scene_list, torch.from_numpy(arrays["mean"]), torch.from_numpy(arrays["std"]), **kwargs)

    def latent_std(self) -> float:
        """The standard deviation of latent samples, whose inverse is the model's `scale_factor`."""
        sample = self.mean.float() + self.std.float() * torch.randn(self.mean.shape, generator=torch.Generator())
        return float(sample.std())

    def batch(self, batch_size: int, rng: np.random.Generator, generator: torch.Generator) -> tuple[Tensor, list[str]]:
        """Latent samples (unscaled) and captions of `batch_size` random scenes."""
        index = rng.integers(0, len(self.scenes), batch_size)
        mean, std = self.mean[index].float(), self.std[index].float()
        z = mean + std * torch.randn(mean.shape, generator=generator)
        captions = ["" if rng.random() < self.caption_dropout else random_caption(self.scenes[i], rng) for i in index]
        return z, captions


def min_snr_weights(alphas_cumprod: Tensor, t: Tensor, gamma: float) -> Tensor:
    """Min-SNR-gamma loss weights for eps prediction, min(SNR, gamma) / SNR (Hang et al. 2023)."""
    snr = alphas_cumprod[t] / (1 - alphas_cumprod[t])
    return torch.clamp(snr, max=gamma) / snr


class DiffusionPretraining:
    """UNet + text encoder of a LatentDiffusion trained on cached scene latents, with an EMA of both."""

    def __init__(self, model: nn.Module, latents: SceneLatents, lr: float = 3e-4, batch_size: int = 32,
                 warmup: int = 1000, ema_decay: float = 0.9995, snr_gamma: float = 5.0, seed: int = 0):
        self.model, self.latents = model, latents
        self.trained = nn.ModuleDict({"model": model.model, "cond_stage_model": model.cond_stage_model})
        self.trained.requires_grad_(True)
        self.optimizer = adamw(self.trained.parameters(), lr=lr, weight_decay=0.01)
        self.ema = LitEma(self.trained, decay=ema_decay)
        self.lr, self.batch_size, self.warmup, self.snr_gamma = lr, batch_size, warmup, snr_gamma
        self.step = self.warmup_start = 0
        self.rng = np.random.default_rng(seed)
        self.generator = torch.Generator().manual_seed(seed)

    def train_step(self) -> float:
        model = self.model
        for group in self.optimizer.param_groups:
            group["lr"] = self.lr * min(1.0, (self.step - self.warmup_start + 1) / self.warmup)
        z, captions = self.latents.batch(self.batch_size, self.rng, self.generator)
        z = z * model.scale_factor
        t = torch.randint(0, model.num_timesteps, (z.shape[0],), generator=self.generator)
        noise = torch.randn(z.shape, generator=self.generator)
        cond = model.get_learned_conditioning(captions)
        per_sample = model.p_losses(z, cond, t, noise)
        loss = (per_sample * min_snr_weights(model.alphas_cumprod, t, self.snr_gamma)).mean()
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(self.trained.parameters(), 1.0)
        self.optimizer.step()
        self.ema(self.trained)
        self.step += 1
        return loss.item()

    def run(self, steps: int, on_interval: Optional[Callable[[int], None]] = None, interval: int = 2000,
            log_every: int = 200) -> None:
        """Train up to `steps` in all, calling `on_interval(step)` every `interval` steps and at the end."""
        self.model.train()
        started, first, losses = time.monotonic(), self.step, []
        while self.step < steps:
            losses.append(self.train_step())
            if self.step % log_every == 0:
                logger.info("diffusion step %d/%d: loss %.4f, %.2f s/step", self.step, steps, np.mean(losses),
                            (time.monotonic() - started) / (self.step - first))
                losses = []
            if on_interval is not None and (self.step % interval == 0 or self.step == steps):
                on_interval(self.step)

    def ema_state_dict(self) -> dict[str, Tensor]:
        """The whole LatentDiffusion state dict with the EMA weights of the UNet and the text encoder."""
        self.ema.store(self.trained.parameters())
        self.ema.copy_to(self.trained)
        state = {k: v.detach().clone() for k, v in self.model.state_dict().items()}
        self.ema.restore(self.trained.parameters())
        return state

    def state(self) -> dict:
        """Everything needed to go on later: weights, EMA, optimizer and step."""
        return {"state_dict": self.model.state_dict(), "ema": self.ema.state_dict(),
                "optimizer": self.optimizer.state_dict(), "step": self.step,
                "warmup": (self.warmup_start, self.warmup),
                "torch_rng": self.generator.get_state(), "numpy_rng": self.rng.bit_generator.state}

    def restart_at(self, step: int, seed: int, warmup: int = 200) -> None:
        """Go on from loaded weights at `step` with the fresh optimizer warming up again and new random streams."""
        self.step = self.warmup_start = step
        self.warmup = warmup
        self.rng = np.random.default_rng(seed)
        self.generator = torch.Generator().manual_seed(seed)

    def load_state(self, state: dict) -> None:
        self.model.load_state_dict(state["state_dict"])
        self.ema.load_state_dict(state["ema"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.step = int(state["step"])
        self.warmup_start, self.warmup = state.get("warmup", (0, self.warmup))
        self.generator.set_state(state["torch_rng"])
        self.rng.bit_generator.state = state["numpy_rng"]
