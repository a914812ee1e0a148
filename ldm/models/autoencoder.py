"""KL-regularised autoencoder, the first stage of Stable Diffusion v1 (Rombach et al. 2022, sec. 3.1)."""
from typing import Any, Mapping, Optional, Sequence

import pytorch_lightning as pl
import torch
from torch import nn

from ldm.modules.diffusionmodules.model import Decoder, Encoder
from ldm.modules.distributions.distributions import DiagonalGaussianDistribution
from ldm.util import instantiate_from_config


class AutoencoderKL(pl.LightningModule):
    """Image <-> latent autoencoder with a diagonal Gaussian posterior; frozen (inference only) in DreamBooth."""

    def __init__(
        self,
        ddconfig: Mapping[str, Any],
        lossconfig: Mapping[str, Any],
        embed_dim: int,
        ckpt_path: Optional[str] = None,
        ignore_keys: Sequence[str] = (),
        image_key: str = "image",
        colorize_nlabels: Optional[int] = None,
        monitor: Optional[str] = None,
    ) -> None:
        super().__init__()
        if ckpt_path is not None or len(ignore_keys) > 0:
            raise ValueError(
                "AutoencoderKL does not load weights itself (ckpt_path/ignore_keys): the VAE weights come with the "
                "full Stable Diffusion checkpoint given to main.py (--actual_resume) or the scripts (--ckpt)"
            )
        if colorize_nlabels is not None:
            raise ValueError("colorize_nlabels (segmentation inputs) is not supported by this Stable Diffusion VAE")
        if not ddconfig["double_z"]:
            raise ValueError("AutoencoderKL needs ddconfig.double_z=True: the encoder must output mean and logvar")
        self.image_key = image_key
        if monitor is not None:
            self.monitor = monitor
        self.encoder = Encoder(**ddconfig)
        self.decoder = Decoder(**ddconfig)
        self.loss = instantiate_from_config(lossconfig)
        if len(self.loss.state_dict()) > 0:
            raise ValueError(
                f"lossconfig {lossconfig['target']} has weights; this frozen VAE expects a weightless loss such as "
                "torch.nn.Identity so that Stable Diffusion v1 checkpoints load with no extra keys"
            )
        z_channels = ddconfig["z_channels"]
        self.quant_conv = nn.Conv2d(2 * z_channels, 2 * embed_dim, kernel_size=1)
        self.post_quant_conv = nn.Conv2d(embed_dim, z_channels, kernel_size=1)
        self.embed_dim = embed_dim

    def encode(self, x: torch.Tensor) -> DiagonalGaussianDistribution:
        """Posterior q(z|x) for images x in [-1, 1], shape [B, C, H, W]."""
        return DiagonalGaussianDistribution(self.quant_conv(self.encoder(x)))

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        """Images (roughly in [-1, 1]) from unscaled latents z."""
        return self.decoder(self.post_quant_conv(z))

    def forward(
        self, input: torch.Tensor, sample_posterior: bool = True
    ) -> tuple[torch.Tensor, DiagonalGaussianDistribution]:
        """Reconstruction of `input` through a posterior sample (or its mode) and the posterior itself."""
        posterior = self.encode(input)
        z = posterior.sample() if sample_posterior else posterior.mode()
        return self.decode(z), posterior
