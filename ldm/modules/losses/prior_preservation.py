"""DreamBooth's prior-preservation objective (Ruiz et al. 2023, eq. 2): instance loss + reg_weight x class loss."""
from dataclasses import dataclass
from typing import Sequence

import torch


def eps_mse_per_sample(prediction: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Mean squared error of the noise prediction, one value per batch element (the "simple" loss of DDPM)."""
    return (prediction.float() - target.float()).pow(2).flatten(1).mean(dim=1)


@dataclass
class PriorPreservationLoss:
    """Splits a batch into its first `n_instance` (subject) and remaining (class prior) elements."""

    reg_weight: float = 1.0

    def __call__(self, per_sample: torch.Tensor, n_instance: int) -> dict[str, torch.Tensor]:
        """Return `loss`, `loss_instance` and, when class elements are present, `loss_class`."""
        instance = per_sample[:n_instance].mean()
        if per_sample.shape[0] == n_instance:
            return {"loss": instance, "loss_instance": instance}
        class_prior = per_sample[n_instance:].mean()
        return {"loss": instance + self.reg_weight * class_prior, "loss_instance": instance, "loss_class": class_prior}


def concept_losses(per_sample: torch.Tensor, concepts: Sequence[str] | None) -> dict[str, torch.Tensor]:
    """`loss_instance_<name>` for each concept of a batch of several subjects: the mean loss of its instance
    examples (the first len(concepts) of `per_sample`); nothing for a run of one subject."""
    if not concepts:
        return {}
    names = list(concepts)
    return {f"loss_instance_{name}": per_sample[[i for i, each in enumerate(names) if each == name]].mean()
            for name in dict.fromkeys(names)}
