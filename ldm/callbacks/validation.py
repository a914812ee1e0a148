"""Validation samples at fixed seeds every N steps: `<run>/images/validation/step_NNNNNN.png` (a row per prompt) and
its cells, with CLIP-T and CLIP-I of the samples when a CLIP folder is given (`val/clip_t`, `val/clip_i`; with
several concepts, the prompts of each and `val/clip_t_<concept>`, ...), and at the end `progression.png`, one row
per step, from every session of the run."""
import logging
import re
from pathlib import Path
from typing import Any, Optional, Sequence

import pytorch_lightning as pl
import torch
from PIL import Image
from pytorch_lightning.callbacks import Callback

from ldm.callbacks.eval_loss import due
from ldm.data.captions import fill
from ldm.data.datamodule import datasets_of
from ldm.data.image_files import load_rgb
from ldm.eval.paper_metrics import without_identifier
from ldm.images import generation_metadata, labelled_grid, read_metadata, save_image
from ldm.inference.sampling import sample_images, sampling_mode
from ldm.modules.encoders.vision import ClipEmbedder
from ldm.optim.factory import optimizer_eval_mode
from ldm.util import free_memory

logger = logging.getLogger(__name__)
DEFAULT_PROMPTS = ("photo of a {identifier} {class_word}", "photo of a {class_word}",
                   "a photo of a {identifier} {class_word} on the beach")
STEP_FOLDER = re.compile(r"step_(\d{6})$")


def clip_scores(clip, samples: dict[str, list[Image.Image]], real: torch.Tensor, identifier: str) -> dict[str, float]:
    """CLIP-T: each sample against its prompt without the identifier; CLIP-I: the samples of identifier prompts
    against the instance photos' CLIP embeddings `real` (the paper's definitions, ldm/eval/paper_metrics.py)."""
    text_scores, image_scores = [], []
    for prompt, images in samples.items():
        embedded = clip.images(images)
        text_scores += (embedded @ clip.texts([without_identifier(prompt, identifier)]).T)[:, 0].tolist()
        if re.search(rf"\b{re.escape(identifier)}\b", prompt):
            image_scores += (embedded @ real.T).mean(1).tolist()
    scores = {"val/clip_t": sum(text_scores) / len(text_scores)}
    if image_scores:
        scores["val/clip_i"] = sum(image_scores) / len(image_scores)
    return scores


def column_title(cells: Sequence[Path]) -> str:
    """What the columns are, from the cells' own metadata: `1-2: photo of a sks dog, 3-4: ... (seeds 0, 1)`."""
    prompts: dict[str, list[int]] = {}
    seeds: list[int] = []
    for column, cell in enumerate(cells, start=1):
        metadata = read_metadata(cell)
        prompts.setdefault(metadata["prompt"], []).append(column)
        seeds += [] if metadata["seed"] in seeds else [metadata["seed"]]
    spans = [f"{c[0]}-{c[-1]}" if len(c) > 1 else f"{c[0]}" for c in prompts.values()]
    return ", ".join(f"{span}: {prompt}" for span, prompt in zip(spans, prompts)) + \
        f" (seeds {', '.join(str(seed) for seed in seeds)})"


def progression_grid(folder: Path, cell_size: int) -> Optional[Image.Image]:
    """Rows = the steps saved in `folder` (step_NNNNNN/ of cells p<prompt>_s<seed>.png), cells in prompt, seed order,
    under a title that names the columns."""
    steps = sorted((int(m.group(1)), path) for path in folder.iterdir()
                   if path.is_dir() and (m := STEP_FOLDER.match(path.name)))
    rows, last = [], []
    for step, path in steps:
        cells = sorted(path.glob("p*_s*.png"), key=lambda p: tuple(int(n) for n in re.findall(r"\d+", p.stem)))
        if cells:
            rows.append((f"step {step}", [Image.open(c).convert("RGB").resize((cell_size, cell_size)) for c in cells]))
            last = cells
    if not rows:
        return None
    return labelled_grid(rows, max(len(images) for _, images in rows), f"validation samples; {column_title(last)}")


class ValidationSamples(Callback):
    """`lightning.callbacks.validation` (off while `every_n_steps` is 0): DDIM samples of `prompts` (with
    `{identifier}` and `{class_word}`; default: the identifier prompt, the class prompt and one context prompt) at
    `seeds`, every N steps and at the last step, by rank zero, at most `images_per_call` images per sampler call;
    `clip_model` names a local CLIPModel folder."""

    def __init__(self, every_n_steps: int = 0, prompts: Optional[Sequence[str]] = None, seeds: Sequence[int] = (0, 1),
                 ddim_steps: int = 25, scale: float = 7.5, clip_model: Optional[str] = None, cell_size: int = 256,
                 images_per_call: int = 2):
        super().__init__()
        if every_n_steps < 0 or ddim_steps < 1 or not seeds or cell_size < 8 or images_per_call < 1:
            raise ValueError(f"validation needs every_n_steps >= 0, ddim_steps >= 1, at least one seed, cell_size >= 8 "
                             f"and images_per_call >= 1; got {every_n_steps}, {ddim_steps}, {list(seeds)}, "
                             f"{cell_size}, {images_per_call}")
        self.images_per_call = images_per_call
        self.every_n_steps, self.ddim_steps, self.scale = every_n_steps, ddim_steps, scale
        self.templates = list(prompts or DEFAULT_PROMPTS)
        self.seeds = [int(seed) for seed in seeds]
        self.cell_size = cell_size
        self.clip = None
        if clip_model and every_n_steps:
            self.clip = ClipEmbedder(clip_model, flag="lightning.callbacks.validation.params.clip_model")
        self._real: dict[str, torch.Tensor] = {}
        self._logged_step = -1

    def folder(self, trainer: pl.Trainer) -> Path:
        return Path(trainer.default_root_dir) / "images" / "validation"

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        if not due(trainer, self.every_n_steps, self._logged_step):
            return
        self._logged_step = trainer.global_step
        if trainer.is_global_zero:
            self.sample(trainer, pl_module)

    def sample(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> dict[str, float]:
        """Sample, save the step's grid and cells, log the CLIP scores; returns the scores."""
        step = trainer.global_step
        instances = datasets_of(trainer.datamodule.datasets(), "train")
        prompts_of = {name: list(dict.fromkeys(fill(t, d.identifier, d.class_word) for t in self.templates))
                      for name, d in instances.items()}
        prompts = list(dict.fromkeys(prompt for each in prompts_of.values() for prompt in each))
        with optimizer_eval_mode(trainer.optimizers), sampling_mode(pl_module), pl_module.encoders_on_device(), \
                trainer.precision_plugin.forward_context():
            samples = {prompt: sample_images(pl_module, prompt, self.seeds, self.ddim_steps, self.scale,
                                             per_call=self.images_per_call) for prompt in prompts}
        free_memory(pl_module.device)
        scores = {}
        for name, instance in instances.items() if self.clip is not None else ():
            if name not in self._real:  # the photos' embeddings, once per session
                self._real[name] = self.clip.images([load_rgb(p) for p in instance.paths])
            part = clip_scores(self.clip, {p: samples[p] for p in prompts_of[name]}, self._real[name],
                               instance.identifier)
            scores.update({f"{key}_{name}" if name else key: value for key, value in part.items()})
        cells = self.folder(trainer) / f"step_{step:06}"
        cells.mkdir(parents=True, exist_ok=True)
        for k, (prompt, images) in enumerate(samples.items()):
            for seed, image in zip(self.seeds, images):
                metadata = generation_metadata("ddim", self.ddim_steps, self.scale, prompt=prompt, seed=seed, step=step)
                save_image(image, cells / f"p{k}_s{seed}.png", metadata)
        shown = "".join(f", {name[4:].replace('_', '-').upper()} {value:.3f}" for name, value in scores.items())
        save_image(labelled_grid([(prompt, images) for prompt, images in samples.items()], len(self.seeds),
                                 f"step {step}{shown}"), self.folder(trainer) / f"step_{step:06}.png", {"step": step})
        for each in trainer.loggers if scores else []:
            each.log_metrics(scores, step=step)
        logger.info("step %d: validation samples in %s%s", step, self.folder(trainer), shown)
        return scores

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.write_progression(trainer)

    def on_exception(self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException) -> None:
        try:
            self.write_progression(trainer)
        except OSError as err:  # the run's own error is the one to report
            logger.warning("could not write the validation progression: %s", err)

    def write_progression(self, trainer: pl.Trainer) -> Optional[Path]:
        folder = self.folder(trainer)
        if not self.every_n_steps or not trainer.is_global_zero or not folder.is_dir():
            return None
        grid = progression_grid(folder, self.cell_size)
        if grid is None:
            return None
        save_image(grid, folder / "progression.png", {"seeds": self.seeds, "prompts": self.templates})
        logger.info("validation progression: %s", folder / "progression.png")
        return folder / "progression.png"
