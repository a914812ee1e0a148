from ldm.modules.losses.noise_objective import NoiseObjective
from ldm.modules.losses.prior_preservation import PriorPreservationLoss, concept_losses, eps_mse_per_sample

__all__ = ["NoiseObjective", "PriorPreservationLoss", "concept_losses", "eps_mse_per_sample"]
