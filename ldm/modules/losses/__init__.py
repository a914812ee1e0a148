from ldm.modules.losses.prior_preservation import PriorPreservationLoss, eps_mse_per_sample

__all__ = ["PriorPreservationLoss", "eps_mse_per_sample"]
