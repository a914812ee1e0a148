"""Validation samples at fixed seeds every N steps: `<run>/images/validation/step_NNNNNN.png` (a row per prompt) and
its cells, scored by a pluggable scorer (ldm/eval/fidelity.py): with a CLIP folder CLIP-T and CLIP-I (`val/clip_t`,
`val/clip_i`), with a DINO folder `val/dino`, on the toy world the toy scorer's `val/binding`, ...; and `val/fidelity`
from a recipe of them (with several concepts, the prompts of each and `val/clip_t_<concept>`, ...,
`val/fidelity` their mean); the scores go to the run's loggers and to `listeners` (the best step). At the end
`progression.png`, one row per step, from every session of the run."""
import logging
import re
import time
from pathlib import Path
from typing import Any, Mapping, Optional, Sequence

import pytorch_lightning as pl
from PIL import Image
from pytorch_lightning.callbacks import Callback

from ldm.callbacks.eval_loss import Listener, due
from ldm.data.captions import fill
from ldm.data.datamodule import datasets_of
from ldm.eval.fidelity import PaperSampleScorer, SampleScorer, Term, fidelity, parse_recipe
from ldm.images import generation_metadata, labelled_grid, read_metadata, save_image
from ldm.inference.sampling import sample_images, sampling_mode
from ldm.modules.encoders.vision import ClipEmbedder, DinoEmbedder
from ldm.optim.factory import optimizer_eval_mode
from ldm.util import free_memory, instantiate_from_config, mean

logger = logging.getLogger(__name__)
DEFAULT_PROMPTS = ("photo of a {identifier} {class_word}", "photo of a {class_word}",
                   "a photo of a {identifier} {class_word} on the beach")
STEP_FOLDER = re.compile(r"step_(\d{6})$")


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


def progression_grid(folder: Path, cell_size: int, best: Optional[tuple[int, str]] = None) -> Optional[Image.Image]:
    """Rows = the steps saved in `folder` (step_NNNNNN/ of cells p<prompt>_s<seed>.png), cells in prompt, seed order,
    under a title that names the columns; `best` (step, how it was chosen) marks the best step's row."""
    steps = sorted((int(m.group(1)), path) for path in folder.iterdir()
                   if path.is_dir() and (m := STEP_FOLDER.match(path.name)))
    rows, last = [], []
    for step, path in steps:
        cells = sorted(path.glob("p*_s*.png"), key=lambda p: tuple(int(n) for n in re.findall(r"\d+", p.stem)))
        if cells:
            label = f"step {step}" + (f": BEST ({best[1]})" if best and best[0] == step else "")
            rows.append((label, [Image.open(c).convert("RGB").resize((cell_size, cell_size)) for c in cells]))
            last = cells
    if not rows:
        return None
    return labelled_grid(rows, max(len(images) for _, images in rows), f"validation samples; {column_title(last)}")


def build_scorer(scorer: Optional[Mapping], clip_model: Optional[str],
                 dino_model: Optional[str]) -> Optional[SampleScorer]:
    """The scorer a config names (`target:`/`params:`), or the paper's metrics from local CLIP and DINO folders."""
    if scorer is not None and (clip_model or dino_model):
        raise ValueError("validation takes a scorer or clip_model/dino_model, not both")
    if scorer is not None:
        return instantiate_from_config(scorer)
    if not (clip_model or dino_model):
        return None
    flag = "lightning.callbacks.validation.params"
    return PaperSampleScorer(ClipEmbedder(clip_model, flag=f"{flag}.clip_model") if clip_model else None,
                             DinoEmbedder(dino_model, flag=f"{flag}.dino_model") if dino_model else None)


def fidelity_recipe(scorer: Optional[SampleScorer], terms: Optional[Sequence[str]]) -> tuple[tuple[Term, ...], str]:
    """The recipe of `val/fidelity` (`terms`, else the scorer's default when it measures what that names), and when
    there is none, why."""
    if scorer is None:
        if terms:
            raise ValueError("validation.params.fidelity needs a scorer: clip_model, dino_model or scorer")
        return (), "validation has no scorer (clip_model, dino_model or scorer)"
    if terms:
        return parse_recipe(terms, scorer.metrics), ""
    recipe = parse_recipe(scorer.default_recipe)
    unmeasured = [term.metric for term in recipe if term.metric not in scorer.metrics]
    if not unmeasured:
        return recipe, ""
    return (), (f"val/fidelity's default recipe ({', '.join(map(str, recipe))}) needs {', '.join(unmeasured)}, "
                "which is not measured: give validation a dino_model and a clip_model folder, or a recipe of what "
                "it measures (validation.params.fidelity)")


class ValidationSamples(Callback):
    """`lightning.callbacks.validation` (off while `every_n_steps` is 0): DDIM samples of `prompts` (with
    `{identifier}` and `{class_word}`; default: the identifier prompt, the class prompt and one context prompt) at
    `seeds`, every N steps and at the last step, by rank zero, at most `images_per_call` images per sampler call (the
    prompts share a call: 7 prompts at 2 seeds in one call of 14 samples twice as fast as 7 calls on a CPU).
    Scored with `clip_model` and `dino_model` (local CLIPModel and DINO ViT folders) or `scorer` (a `target:`, e.g.
    the toy world's ldm.toy.metrics.ToySampleScorer); `fidelity` is the recipe of `val/fidelity` (default: the
    scorer's), a list of terms whose mean it is: "binding", "1 - leakage", "dino / 0.668"."""

    def __init__(self, every_n_steps: int = 0, prompts: Optional[Sequence[str]] = None, seeds: Sequence[int] = (0, 1),
                 ddim_steps: int = 25, scale: float = 7.5, clip_model: Optional[str] = None,
                 dino_model: Optional[str] = None, scorer: Optional[dict] = None,
                 fidelity: Optional[Sequence[str]] = None, cell_size: int = 256, images_per_call: int = 2):
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
        self.scorer = build_scorer(scorer, clip_model, dino_model) if every_n_steps else None
        self.recipe, self.fidelity_note = fidelity_recipe(self.scorer, fidelity) if every_n_steps else ((), "")
        self.listeners: list[Listener] = []  # called with each step's scores (ldm/callbacks/best_step.py)
        self._logged_step = -1
        self.rounds, self.seconds, self._started = 0, 0.0, time.monotonic()  # this session's rounds and their time

    def folder(self, trainer: pl.Trainer) -> Path:
        return Path(trainer.default_root_dir) / "images" / "validation"

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        if not due(trainer, self.every_n_steps, self._logged_step):
            return
        self._logged_step = trainer.global_step
        if trainer.is_global_zero:
            started = time.monotonic()
            self.sample(trainer, pl_module)
            self.rounds, self.seconds = self.rounds + 1, self.seconds + time.monotonic() - started

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._started = time.monotonic()

    def score(self, samples: dict[str, list[Image.Image]], prompts_of: dict[str, list[str]],
              instances: Mapping[str, Any]) -> dict[str, float]:
        """The scorer's metrics of each concept's samples and their fidelity (`val/<metric>`, or with several
        concepts `val/<metric>_<concept>` and `val/fidelity` the mean of theirs)."""
        scores, fidelities = {}, []
        for name, instance in instances.items():
            part = self.scorer({p: samples[p] for p in prompts_of[name]}, instance.identifier, instance.class_word,
                               instance.paths)
            value = fidelity(self.recipe, part)
            if value is not None:
                part["fidelity"] = value
                fidelities.append(value)
            elif self.recipe and not self.fidelity_note:
                missing = ", ".join(sorted({t.metric for t in self.recipe} - set(part)))
                self.fidelity_note = (f"val/fidelity needs {missing}, which the scorer did not give for the prompts "
                                      f"{prompts_of[name]} (validation.params.prompts)")
                logger.warning("validation: %s", self.fidelity_note)
            scores.update({f"val/{key}_{name}" if name else f"val/{key}": v for key, v in part.items()})
        if len(instances) > 1 and len(fidelities) == len(instances):
            scores["val/fidelity"] = mean(fidelities)
        return scores

    def sample(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> dict[str, float]:
        """Sample, save the step's grid and cells, log the scores and tell the listeners; returns the scores."""
        step = trainer.global_step
        instances = datasets_of(trainer.datamodule.datasets(), "train")
        prompts_of = {name: list(dict.fromkeys(fill(t, d.identifier, d.class_word) for t in self.templates))
                      for name, d in instances.items()}
        prompts = list(dict.fromkeys(prompt for each in prompts_of.values() for prompt in each))
        with optimizer_eval_mode(trainer.optimizers), sampling_mode(pl_module), pl_module.encoders_on_device(), \
                trainer.precision_plugin.forward_context():
            images = sample_images(pl_module, [p for p in prompts for _ in self.seeds], self.seeds * len(prompts),
                                   self.ddim_steps, self.scale, per_call=self.images_per_call)
        samples = {prompt: images[k * len(self.seeds):(k + 1) * len(self.seeds)] for k, prompt in enumerate(prompts)}
        free_memory(pl_module.device)
        scores = self.score(samples, prompts_of, instances) if self.scorer is not None else {}
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
        for listen in self.listeners:
            listen(trainer, pl_module, scores)
        return scores

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.write_progression(trainer)
        if self.rounds and trainer.is_global_zero:
            total = time.monotonic() - self._started
            logger.info("validation: %d rounds took %.0f s, %.0f %% of this session's %.0f s of training (the best step's "
                        "bookkeeping included)", self.rounds, self.seconds, 100 * self.seconds / max(total, 1e-9), total)

    def on_exception(self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException) -> None:
        try:
            self.write_progression(trainer)
        except OSError as err:  # the run's own error is the one to report
            logger.warning("could not write the validation progression: %s", err)

    def write_progression(self, trainer: pl.Trainer, best: Optional[tuple[int, str]] = None) -> Optional[Path]:
        """`progression.png`; `best` (step, how it was chosen: the best step callback's) marks a row."""
        folder = self.folder(trainer)
        if not self.every_n_steps or not trainer.is_global_zero or not folder.is_dir():
            return None
        grid = progression_grid(folder, self.cell_size, best)
        if grid is None:
            return None
        metadata = {"seeds": self.seeds, "prompts": self.templates, **({"best_step": best[0]} if best else {})}
        save_image(grid, folder / "progression.png", metadata)
        logger.info("validation progression: %s", folder / "progression.png")
        return folder / "progression.png"
