"""Sample images during training: DDIM samples of the instance prompt and of the class prompt, as labelled grids."""
import logging
from pathlib import Path
from typing import Any, Callable, Mapping, Optional

import pytorch_lightning as pl
import torch
from pytorch_lightning.callbacks import Callback

from ldm.data.batch import prefixes
from ldm.images import generation_metadata, labelled_grid, save_image, to_pil
from ldm.inference.sampling import sample_images, sampling_mode
from ldm.optim.factory import optimizer_eval_mode
from ldm.util import free_memory

logger = logging.getLogger(__name__)


class ImageLogger(Callback):
    """Every `batch_frequency` steps, `max_images` samples per prompt (the same seeds each time, so grids compare
    across steps) and the batch's input images, saved under `<run>/images/train/` by rank zero. Each grid has a title
    strip (the prompt) and its rows labelled instance or class, in Pillow's built-in font. With `preview_every` k > 0,
    also a strip per prompt of the first seed's predicted clean image after every k-th sampler step (and the last).
    At most `images_per_call` images go through the sampler (and the previews' decoder) at once; the GPU's cache is
    freed after."""

    def __init__(self, batch_frequency: int = 500, max_images: int = 8, ddim_steps: int = 50, scale: float = 10.0,
                 seed: int = 23, images_per_row: int = 4, log_first_step: bool = False, disabled: bool = False,
                 preview_every: int = 0, images_per_call: int = 2):
        super().__init__()
        if batch_frequency < 1 or max_images < 0 or ddim_steps < 1 or preview_every < 0 or images_per_call < 1:
            raise ValueError(f"need batch_frequency >= 1, max_images >= 0, ddim_steps >= 1, preview_every >= 0, "
                             f"images_per_call >= 1, got {batch_frequency}, {max_images}, {ddim_steps}, "
                             f"{preview_every}, {images_per_call}")
        self.images_per_call = images_per_call
        self.preview_every = preview_every
        self.batch_frequency = batch_frequency
        self.max_images = max_images
        self.ddim_steps = ddim_steps
        self.scale = scale
        self.seed = seed
        self.images_per_row = images_per_row
        self.log_first_step = log_first_step
        self.disabled = disabled
        self._logged_step = -1

    def _due(self, step: int) -> bool:
        return step != self._logged_step and (step % self.batch_frequency == 0 or (self.log_first_step and step == 1))

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any,
                           batch: Mapping[str, Any], batch_idx: int) -> None:
        step = trainer.global_step
        if self.disabled or not self.max_images or step == 0 or not self._due(step):
            return
        self._logged_step = step
        if not trainer.is_global_zero:
            return
        folder = Path(trainer.default_root_dir) / "images" / "train"
        folder.mkdir(parents=True, exist_ok=True)
        suffix = f"gs-{step:06}_e-{trainer.current_epoch:06}_b-{batch_idx:06}.png"
        caption_key = pl_module.cond_stage_key
        kinds = dict(zip(("instance", "class"), prefixes(batch, caption_key)))
        decoded = "" if pl_module.first_stage_key in batch else " (decoded from the cached latents)"
        seeds = list(range(self.seed, self.seed + self.max_images))
        with optimizer_eval_mode(trainer.optimizers), sampling_mode(pl_module), pl_module.encoders_on_device(), \
                trainer.precision_plugin.forward_context():
            inputs = [(kind, to_pil(pl_module.input_images(batch, prefix))) for kind, prefix in kinds.items()]
            save_image(labelled_grid(inputs, self.images_per_row, f"training inputs, step {step}{decoded}"),
                       folder / f"inputs_{suffix}", {"step": step})
            for kind, prefix in kinds.items():
                # the batch's first caption that caption_dropout left, else its dataset's first
                captions = [c for c in batch[f"{prefix}{caption_key}"] if c]
                first = trainer.datamodule.concepts[0]
                prompt = captions[0] if captions else (first.class_prior if prefix else first.instance).captions[0]
                previews: list[tuple[int, torch.Tensor]] = []
                images = sample_images(pl_module, prompt, seeds, self.ddim_steps, self.scale,
                                       on_prediction=self._collector(previews), per_call=self.images_per_call)
                if previews:
                    strip = to_pil(torch.cat([pl_module.decode_first_stage(x0) for x0 in
                                              torch.cat([x0 for _, x0 in previews]).split(self.images_per_call)]))
                    save_image(labelled_grid([(f"seed {seeds[0]}", strip)], len(strip),
                                             f"{prompt}: predicted clean image after DDIM steps "
                                             f"{', '.join(str(i) for i, _ in previews)} (training step {step})"),
                               folder / f"previews_{kind}_{suffix}", {"prompt": prompt, "step": step})
                save_image(labelled_grid([(kind, images)], self.images_per_row, f"{prompt} (step {step})"),
                           folder / f"samples_{kind}_{suffix}",
                           generation_metadata("ddim", self.ddim_steps, self.scale, prompt=prompt, step=step,
                                               seeds=seeds, width=images[0].width, height=images[0].height))
        free_memory(pl_module.device)
        logger.info("step %d: sample grids in %s", step, folder)

    def _collector(self, previews: list) -> Optional[Callable[[torch.Tensor, int], None]]:
        """A sampler callback that keeps the first image's predicted x0 after every `preview_every`-th step."""
        if not self.preview_every:
            return None

        def keep(pred_x0: torch.Tensor, i: int) -> None:
            if (i + 1) % self.preview_every == 0 or i + 1 == self.ddim_steps:
                previews.append((i + 1, pred_x0[:1].detach().clone()))
        return keep
