"""DreamBooth's prior-preservation objective (Ruiz et al. 2023, eq. 2): instance loss + reg_weight x class loss. The
class term's examples are class images (`class_images`, the paper's), or the instance latents noised afresh under the
class prompt with the frozen base model's own prediction as the target (`frozen_model`: OneTrainer's prior model
preservation, ai-toolkit's output preservation), which needs no class images."""
from dataclasses import dataclass
from typing import Callable, Sequence

import torch

from ldm.util import UserError

PRIOR_SOURCES = ("class_images", "frozen_model")
Denoise = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


def eps_mse_per_sample(prediction: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Mean squared error of the noise prediction, one value per batch element (the "simple" loss of DDPM)."""
    return (prediction.float() - target.float()).pow(2).flatten(1).mean(dim=1)


@dataclass
class PriorPreservationLoss:
    """Splits a batch into its first `n_instance` (subject) and remaining (class prior) elements; `source` says
    where the class elements come from."""

    reg_weight: float = 1.0
    source: str = "class_images"

    def check(self) -> None:
        if self.source not in PRIOR_SOURCES:
            raise UserError(f"model.params.prior_preservation {self.source!r} (--prior): expected one of "
                            f"{', '.join(PRIOR_SOURCES)}")

    def __call__(self, per_sample: torch.Tensor, n_instance: int) -> dict[str, torch.Tensor]:
        """Return `loss`, `loss_instance` and, when class elements are present, `loss_class`."""
        instance = per_sample[:n_instance].mean()
        if per_sample.shape[0] == n_instance:
            return {"loss": instance, "loss_instance": instance}
        class_prior = per_sample[n_instance:].mean()
        return {"loss": instance + self.reg_weight * class_prior, "loss_instance": instance, "loss_class": class_prior}


@dataclass
class FrozenModelTarget:
    """The class elements' target under `frozen_model`: `denoise`, the frozen base model's prediction (eps, or
    whatever the model predicts), on the same noisy latents and timesteps, under `cond`, the frozen model's
    conditioning of the class prompts of the elements from `first` on."""

    denoise: Denoise
    cond: torch.Tensor
    first: int

    @torch.no_grad()
    def apply(self, x_noisy: torch.Tensor, t: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """`target` with its class elements replaced by the frozen model's prediction."""
        n = self.first
        frozen = self.denoise(x_noisy[n:], t[n:], self.cond).to(target.dtype)
        return torch.cat([target[:n], frozen])


def concept_losses(per_sample: torch.Tensor, concepts: Sequence[str] | None) -> dict[str, torch.Tensor]:
    """`loss_instance_<name>` for each concept of a batch of several subjects: the mean loss of its instance
    examples (the first len(concepts) of `per_sample`); nothing for a run of one subject."""
    if not concepts:
        return {}
    names = list(concepts)
    return {f"loss_instance_{name}": per_sample[[i for i, each in enumerate(names) if each == name]].mean()
            for name in dict.fromkeys(names)}
