"""A stable evaluation loss: every `every_n_steps` steps, the training objective on one fixed set (each instance
photo and the first class images, each at fixed timesteps spread over [0, T), with fixed noise and fixed flips),
logged as `val/loss`, `val/loss_instance`, `val/loss_class` and per timestep band (`val/loss_t0-249`, ...); with
several concepts also `val/loss_instance_<concept>`.

Everything random is drawn once from `seed` on a generator of its own (training's random stream is untouched), the
latents are their posterior means, and the set is evaluated in the same chunks each time, so the same weights give
the same value bit for bit, in another run or after a resume."""
import logging
from dataclasses import dataclass
from typing import Any, Callable, Mapping, Optional

import pytorch_lightning as pl
import torch
from einops import rearrange
from pytorch_lightning.callbacks import Callback

from ldm.data.datamodule import datasets_of
from ldm.modules.losses import concept_losses
from ldm.optim.factory import optimizer_eval_mode

logger = logging.getLogger(__name__)
Listener = Callable[[pl.Trainer, pl.LightningModule, dict[str, float]], None]  # told a monitor's metrics of a step


@dataclass
class EvaluationSet:
    """Latents [C, h, w] (sizes differ with aspect buckets), their captions, noise and timesteps of the N (example,
    timestep) pairs; the first `n_instance` pairs are of instance photos, of the concepts named in `concepts` (empty
    names for a run of one subject)."""
    latents: list[torch.Tensor]
    captions: list[str]
    noise: list[torch.Tensor]
    timesteps: torch.Tensor
    n_instance: int
    concepts: list[str]


def spread_timesteps(count: int, num_timesteps: int) -> torch.Tensor:
    """`count` timesteps at the centres of equal parts of [0, num_timesteps)."""
    return ((torch.arange(count, dtype=torch.float64) + 0.5) * num_timesteps / count).long()


def band_names(bands: int, num_timesteps: int) -> list[tuple[str, int, int]]:
    """(name, low, high) of `bands` equal timestep bands: `loss_t0-249`, `loss_t250-499`, ... for 4 bands of 1000."""
    edges = [round(k * num_timesteps / bands) for k in range(bands + 1)]
    return [(f"loss_t{low}-{high - 1}", low, high) for low, high in zip(edges, edges[1:])]


@torch.no_grad()
def example_latent(pl_module: pl.LightningModule, dataset, k: int, flip: bool) -> torch.Tensor:
    """The posterior mean of one example (from the cached moments when the dataset has them), scaled as in training."""
    if dataset.moments is not None:
        moments = dataset.moments[k][dataset.flips.index(flip)][None]
    else:
        x = rearrange(dataset.image(k, flip)[None], "b h w c -> b c h w").contiguous().to(pl_module.device)
        with pl_module.encoders_on_device():
            moments = pl_module.encode_first_stage(x).parameters
    return (pl_module.scale_factor * moments.float().to(pl_module.device).chunk(2, dim=1)[0])[0].cpu()


def build_set(pl_module: pl.LightningModule, datasets: Mapping[str, Any], timesteps: int, class_images: int,
              seed: int) -> EvaluationSet:
    """The fixed set: every instance photo and the first `class_images` images of each class set, each at
    `timesteps` timesteps. `datasets` are the data module's: `train` and `reg`, or with several concepts
    `train/<name>` and `reg/<name>`."""
    generator = torch.Generator().manual_seed(seed)
    latents, captions, concepts = [], [], []
    instance = datasets_of(datasets, "train")
    n_photos = sum(len(d.paths) for d in instance.values())
    parts = [(name, d, len(d.paths)) for name, d in instance.items()] + [
        (name, d, min(class_images, len(d.paths))) for name, d in datasets_of(datasets, "reg").items()]
    for name, dataset, count in parts:
        flips = [bool(torch.rand((), generator=generator) < dataset.flip_p) for _ in range(count)]
        latents += [example_latent(pl_module, dataset, k, flip) for k, flip in enumerate(flips)]
        captions += dataset.captions[:count]
        concepts += [name] * count
    ts = spread_timesteps(timesteps, pl_module.num_timesteps)
    noise = [torch.randn(z.shape, generator=generator) for z in latents for _ in range(timesteps)]
    return EvaluationSet(latents=[z for z in latents for _ in range(timesteps)],
                         captions=[c for c in captions for _ in range(timesteps)], noise=noise,
                         timesteps=ts.repeat(len(latents)), n_instance=n_photos * timesteps,
                         concepts=[c for c in concepts[:n_photos] for _ in range(timesteps)])


@torch.no_grad()
def evaluation_losses(pl_module: pl.LightningModule, fixed: EvaluationSet, batch_size: int) -> torch.Tensor:
    """The objective's per-pair loss on the fixed set, in chunks of `batch_size` pairs of one latent size."""
    device, losses = pl_module.device, torch.empty(len(fixed.captions), dtype=torch.float32)  # bf16-true: not default
    groups: dict[tuple, list[int]] = {}
    for index, z in enumerate(fixed.latents):
        groups.setdefault(tuple(z.shape), []).append(index)
    for indices in groups.values():
        for start in range(0, len(indices), batch_size):
            part = indices[start:start + batch_size]
            z = torch.stack([fixed.latents[i] for i in part]).to(device)
            noise = torch.stack([fixed.noise[i] for i in part]).to(device)
            t = fixed.timesteps[part].to(device)
            cond = pl_module.get_learned_conditioning([fixed.captions[i] for i in part])
            prediction = pl_module.apply_model(pl_module.q_sample(z, t, noise), t, cond)
            losses[part] = pl_module.objective.noise.per_sample(prediction, noise, t, pl_module.alphas_cumprod,
                                                          pl_module.num_timesteps).float().cpu()
    return losses


def due(trainer: pl.Trainer, every_n_steps: int, logged_step: int) -> bool:
    """Whether a monitor runs after this step: every `every_n_steps` (0: never) and at max_steps, once per step."""
    step = trainer.global_step
    last = trainer.max_steps is not None and 0 < trainer.max_steps <= step
    return every_n_steps > 0 and step != logged_step and (step % every_n_steps == 0 or last)


class EvaluationLoss(Callback):
    """`lightning.callbacks.eval_loss` (off while `every_n_steps` is 0): the loss on the fixed set every N steps and
    at the last step, written to the run's loggers (CSV, TensorBoard) at the step of the weights it measured."""

    def __init__(self, every_n_steps: int = 0, timesteps: int = 10, bands: int = 4, class_images: int = 4,
                 batch_size: int = 8, seed: int = 0):
        super().__init__()
        if every_n_steps < 0 or timesteps < 1 or not 1 <= bands <= timesteps or class_images < 0 or batch_size < 1:
            raise ValueError(f"eval_loss needs every_n_steps >= 0, 1 <= bands <= timesteps, class_images >= 0 and "
                             f"batch_size >= 1; got {every_n_steps}, {bands}, {timesteps}, {class_images}, "
                             f"{batch_size}")
        self.every_n_steps, self.timesteps, self.bands = every_n_steps, timesteps, bands
        self.class_images, self.batch_size, self.seed = class_images, batch_size, seed
        self.fixed: Optional[EvaluationSet] = None
        self.listeners: list[Listener] = []  # called with each step's metrics (ldm/callbacks/best_step.py)
        self._logged_step = -1

    def evaluate(self, pl_module: pl.LightningModule, datasets: Mapping[str, Any]) -> dict[str, float]:
        """The metrics of the current weights (trained weights, eval mode)."""
        was_training = pl_module.training
        pl_module.eval()
        try:
            if self.fixed is None:
                self.fixed = build_set(pl_module, datasets, self.timesteps, self.class_images, self.seed)
            with pl_module.encoders_on_device():
                per_pair = evaluation_losses(pl_module, self.fixed, self.batch_size)
        finally:
            pl_module.train(was_training)
        metrics = {**pl_module.objective.prior(per_pair, self.fixed.n_instance),
                   **concept_losses(per_pair, [c for c in self.fixed.concepts if c] or None)}
        t, n = self.fixed.timesteps, self.fixed.n_instance
        for name, low, high in band_names(self.bands, pl_module.num_timesteps):
            band = (t >= low) & (t < high)
            metrics[name] = pl_module.objective.prior(per_pair[band], int(band[:n].sum()))["loss"]
        return {f"val/{name}": float(value) for name, value in metrics.items()}

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        if not due(trainer, self.every_n_steps, self._logged_step):
            return
        self._logged_step = trainer.global_step
        if not trainer.is_global_zero:
            return
        with optimizer_eval_mode(trainer.optimizers), trainer.precision_plugin.forward_context():
            metrics = self.evaluate(pl_module, trainer.datamodule.datasets())
        for each in trainer.loggers:
            each.log_metrics(metrics, step=trainer.global_step)
        logger.info("step %d: evaluation loss %.5f", trainer.global_step, metrics["val/loss"])
        for listen in self.listeners:
            listen(trainer, pl_module, metrics)
