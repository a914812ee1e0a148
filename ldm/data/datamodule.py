"""The Lightning data module of a DreamBooth run: instance (`train`) and class (`reg`) datasets from their configs."""
import os
from pathlib import Path
from typing import Mapping, Sequence

import pytorch_lightning as pl
from torch.utils.data import DataLoader, Dataset

from ldm.data.buckets import BucketBatches
from ldm.data.captions import fill
from ldm.data.concepts import Concept, ConceptPairs, class_set_key, concept_configs
from ldm.data.image_files import DataError
from ldm.data.personalized import CLASS_TEMPLATE, DEFAULT_CLASS_WORD, count_images
from ldm.util import instantiate_from_config


def datasets_of(datasets: Mapping[str, Dataset], role: str) -> dict[str, Dataset]:
    """The datasets of one role (`train` or `reg`) among `DataModuleFromConfig.datasets()`, by concept name (""
    for a run of one subject)."""
    return {name.partition("/")[2]: dataset for name, dataset in datasets.items() if name.partition("/")[0] == role}


class DataModuleFromConfig(pl.LightningDataModule):
    """Pairs every instance example with a class example of its concept (ldm/data/concepts.py: `concepts` lists
    several subjects, `resolutions` several sizes; by default one concept from `train` and `reg`);
    `num_class_images` > 0 asks for that many class images in each class folder (generated with `class_prompt`,
    `class_negative_prompt` and `class_sampler`); `cache_latents` means that the datasets yield cached VAE moments
    (ldm/training/latent_cache.py gives them before fit); `prior_captions` (prior preservation by the frozen model,
    no class images) gives every instance example its subject's class prompt (`class_prompt`, by default the class
    template "photo of a {class_word}")."""

    def __init__(self, batch_size: int, train: Mapping, reg: Mapping | None = None, num_workers: int = 0,
                 num_class_images: int = 0, cache_latents: bool = False, class_prompt: str | None = None,
                 class_negative_prompt: str = "", class_sampler: str = "ddim",
                 concepts: Sequence[Mapping] | None = None, resolutions: Sequence[int] | None = None,
                 prior_captions: bool = False):
        super().__init__()
        if batch_size < 1 or num_workers < 0 or num_class_images < 0:
            raise ValueError(f"need batch_size >= 1, num_workers >= 0, num_class_images >= 0, "
                             f"got {batch_size}, {num_workers}, {num_class_images}")
        self.batch_size = batch_size
        self.num_workers = num_workers
        self.num_class_images = num_class_images
        self.class_generation = {"prompt": class_prompt, "negative_prompt": class_negative_prompt,
                                 "sampler": class_sampler}  # how missing class images are generated
        self.cache_latents = cache_latents
        self.prior_captions = prior_captions
        for name, config in (("train", train), ("reg", reg or {})):
            if cache_latents and (config.get("params") or {}).get("crop") == "random":
                raise DataError(f"data.params.{name}.params.crop is random, which cannot be cached (the crop changes "
                                "every step): use crop center or none with --cache_latents (data.params.cache_latents)")
        self.train_config, self.reg_config = train, reg
        self.concept_configs = concept_configs(train, reg, concepts, resolutions)
        self.concepts: list[Concept] = []

    @property
    def instance(self) -> Dataset | None:
        """The first concept's instance set (the only one of a run with one subject)."""
        return self.concepts[0].instance if self.concepts else None

    @property
    def class_prior(self) -> Dataset | None:
        """The first concept's class set, once built."""
        return self.concepts[0].class_prior if self.concepts else None

    def prior_prompts(self) -> list[str]:
        """Each concept's class prompt for prior preservation by the frozen model: the class captions' template
        (`class_prompt`, else "photo of a {class_word}") filled with its identifier and class word."""
        template = self.class_generation["prompt"] or CLASS_TEMPLATE
        return [fill(template, concept.instance.identifier, concept.instance.class_word) for concept in self.concepts]

    def class_folders(self) -> dict[str, str]:
        """Each class folder of the run (`reg.params.data_root` of the concepts) with its class word."""
        folders: dict[str, str] = {}
        for concept in self.concept_configs:
            params = (concept.reg or {}).get("params") or {}
            if concept.reg is not None and params.get("data_root"):
                folders.setdefault(str(params["data_root"]), params.get("class_word", DEFAULT_CLASS_WORD))
        return folders

    @property
    def class_folder(self) -> str | None:
        """The first class folder, or None without prior preservation."""
        return next(iter(self.class_folders()), None)

    def missing_class_images(self) -> int:
        """How many class images must be generated before training to reach `num_class_images` in every folder."""
        return sum(count for _, _, count in self.class_image_jobs())

    def class_image_jobs(self) -> list[tuple[str, str, int]]:
        """(folder, class word, how many to generate) of every class folder short of `num_class_images`."""
        jobs = [(folder, word, self.num_class_images - count_images(folder))
                for folder, word in self.class_folders().items()]
        return [job for job in jobs if job[2] > 0]

    def setup(self, stage: str | None = None) -> None:
        """Build (and so check) the instance sets, and the class sets once no class image is missing."""
        class_roots = {str(Path(folder).resolve()) for folder in self.class_folders()}
        for concept in self.concept_configs:
            instance_root = (concept.train.get("params") or {}).get("data_root")
            if instance_root and str(Path(instance_root).resolve()) in class_roots:
                raise DataError(f"--data_root and --reg_data_root are the same folder ({instance_root}): the class "
                                "images must be other pictures of the class, not the subject's photos (or generate "
                                "them with --num_class_images into a folder of their own)")
        if not self.concepts:
            self.concepts = [Concept(c.name, instantiate_from_config(c.train), None) for c in self.concept_configs]
        if self.reg_config is not None and self.class_prior is None and not self.missing_class_images():
            class_sets: dict[tuple, Dataset] = {}
            for concept, config in zip(self.concepts, self.concept_configs):
                key = class_set_key(config.reg)
                if key not in class_sets:
                    class_sets[key] = instantiate_from_config(config.reg)
                concept.class_prior = class_sets[key]

    def datasets(self) -> dict[str, Dataset]:
        """The datasets built so far by name: `train`, and `reg` once no class image is missing; with several
        concepts `train/<concept>` and `reg/<concept>` for each (a shared class set under its first concept)."""
        if len(self.concepts) == 1:
            concept = self.concepts[0]
            return {name: dataset for name, dataset in (("train", concept.instance), ("reg", concept.class_prior))
                    if dataset is not None}
        named, seen = {}, set()
        for concept in self.concepts:
            named[f"train/{concept.name}"] = concept.instance
            if concept.class_prior is not None and id(concept.class_prior) not in seen:
                seen.add(id(concept.class_prior))
                named[f"reg/{concept.name}"] = concept.class_prior
        return named

    def train_dataloader(self) -> DataLoader:
        self.setup()
        if self.reg_config is not None and self.class_prior is None:
            raise RuntimeError(f"{self.missing_class_images()} class images are still missing in "
                               f"{', '.join(folder for folder, _, _ in self.class_image_jobs())}")
        if self.cache_latents and any(dataset.moments is None for dataset in self.datasets().values()):
            raise RuntimeError("cache_latents is set but the datasets have no cached moments: call "
                               "ldm.training.latent_cache.cache_latents before fit")
        dataset = ConceptPairs(self.concepts, self.prior_prompts() if self.prior_captions else None)
        if self.grouped():
            keys = [(c, concept.instance.target_size(k % len(concept.instance.paths)))
                    for c, concept in enumerate(self.concepts) for k in range(len(concept.instance))]
            class_buckets = None if self.class_prior is None else [
                [concept.class_prior.target_size(k) for k in range(len(concept.class_prior.paths))]
                for concept in self.concepts]
            # seeded as Lightning seeds its DistributedSampler: alike on every rank
            batches = BucketBatches(keys, class_buckets, self.batch_size, seed=int(os.environ.get("PL_GLOBAL_SEED", 0)))
            return DataLoader(dataset, batch_sampler=batches, num_workers=self.num_workers,
                              persistent_workers=self.num_workers > 0)
        return DataLoader(dataset, batch_size=self.batch_size, shuffle=True, num_workers=self.num_workers,
                          persistent_workers=self.num_workers > 0, drop_last=False)

    def grouped(self) -> bool:
        """Whether batches must come from one group of examples of one size: with aspect buckets, or concepts of
        several sizes."""
        sizes = {concept.instance.size for concept in self.concepts}
        return len(sizes) > 1 or any(getattr(c.instance, "bucket_of", None) is not None for c in self.concepts)
