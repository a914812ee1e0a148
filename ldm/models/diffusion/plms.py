"""PLMS sampling (Liu et al. 2022, PNDM) with the CompVis `PLMSSampler` interface, on top of the DDIM schedule."""
from typing import Optional

from torch import Tensor

from ldm.models.diffusion.ddim import DDIMSampler
from ldm.models.diffusion.guidance import guided_eps
from ldm.models.diffusion.sampling import Generator


class PLMSSampler(DDIMSampler):
    """Pseudo linear multistep: pseudo improved Euler first, then Adams-Bashforth up to order 4 on eps (PNDM eq. 12)."""

    name = "PLMS"

    def make_schedule(self, ddim_num_steps: int, ddim_eta: float = 0.0) -> None:
        """The DDIM timesteps; PLMS is deterministic, so eta must be 0."""
        if ddim_eta != 0:
            raise ValueError(f"PLMS is deterministic: eta must be 0, got {ddim_eta}")
        super().make_schedule(ddim_num_steps, 0.0)

    def _start(self) -> None:
        self.old_eps: list[Tensor] = []

    def _step(self, x: Tensor, c: Tensor, t: Tensor, index: int, scale: float, uncond: Optional[Tensor],
              generator: Generator) -> tuple[Tensor, Tensor]:
        x_prev, pred_x0, e_t = self.p_sample_plms(x, c, t, index, scale, uncond)
        self.old_eps = (self.old_eps + [e_t])[-3:]
        return x_prev, pred_x0

    def p_sample_plms(self, x: Tensor, c: Tensor, t: Tensor, index: int, unconditional_guidance_scale: float = 1.0,
                      unconditional_conditioning: Optional[Tensor] = None) -> tuple[Tensor, Tensor, Tensor]:
        """One PLMS step from schedule index `index`; returns (x_prev, pred_x0, eps at x)."""
        def eps(x_in: Tensor, t_in: Tensor) -> Tensor:
            return guided_eps(self.model, x_in, t_in, c, unconditional_conditioning, unconditional_guidance_scale)

        e_t, old = eps(x, t), self.old_eps
        if not old:
            x_next, _ = self.x_prev_and_pred_x0(x, e_t, index)
            t_next = t.new_full(t.shape, int(self.ddim_timesteps[max(index - 1, 0)]))
            e_prime = (e_t + eps(x_next, t_next)) / 2
        elif len(old) == 1:
            e_prime = (3 * e_t - old[-1]) / 2
        elif len(old) == 2:
            e_prime = (23 * e_t - 16 * old[-1] + 5 * old[-2]) / 12
        else:
            e_prime = (55 * e_t - 59 * old[-1] + 37 * old[-2] - 9 * old[-3]) / 24
        x_prev, pred_x0 = self.x_prev_and_pred_x0(x, e_prime, index)
        return x_prev, pred_x0, e_t
