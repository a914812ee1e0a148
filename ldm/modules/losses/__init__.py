from ldm.modules.losses.dreambooth import DreamBoothObjective
from ldm.modules.losses.noise_objective import NoiseObjective
from ldm.modules.losses.prior_preservation import (PRIOR_SOURCES, FrozenModelTarget, PriorPreservationLoss,
                                                   concept_losses, eps_mse_per_sample)
from ldm.modules.losses.rollout import Rollout

__all__ = ["PRIOR_SOURCES", "DreamBoothObjective", "FrozenModelTarget", "NoiseObjective", "PriorPreservationLoss",
           "Rollout", "concept_losses", "eps_mse_per_sample"]
