"""The Lightning data module of a DreamBooth run: instance (`train`) and class (`reg`) datasets from their configs."""
from pathlib import Path
from typing import Mapping

import pytorch_lightning as pl
from torch.utils.data import DataLoader, Dataset

from ldm.data.buckets import BucketBatches
from ldm.data.personalized import DEFAULT_CLASS_WORD, IMAGE_SUFFIXES, DataError, InstanceClassPairs
from ldm.util import instantiate_from_config


def count_images(folder: str | Path | None) -> int:
    """How many image files `folder` holds (0 when it does not exist); hidden files are not counted."""
    if folder is None or not Path(folder).is_dir():
        return 0
    return sum(1 for p in Path(folder).iterdir()
               if p.is_file() and not p.name.startswith(".") and p.suffix.lower() in IMAGE_SUFFIXES)


class DataModuleFromConfig(pl.LightningDataModule):
    """Pairs every instance example with a class example; `num_class_images` > 0 asks for that many class images
    (generated with `class_prompt`, `class_negative_prompt` and `class_sampler`);
    `cache_latents` means that the datasets yield cached VAE moments (ldm/latent_cache.py gives them before fit)."""

    def __init__(self, batch_size: int, train: Mapping, reg: Mapping | None = None, num_workers: int = 0,
                 num_class_images: int = 0, cache_latents: bool = False, class_prompt: str | None = None,
                 class_negative_prompt: str = "", class_sampler: str = "ddim"):
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
        for name, config in (("train", train), ("reg", reg or {})):
            if cache_latents and (config.get("params") or {}).get("buckets"):
                raise DataError(f"data.params.{name}.params.buckets with --cache_latents (data.params.cache_latents) "
                                "is not supported yet: the cache holds one size per dataset; train without caching")
            if cache_latents and (config.get("params") or {}).get("crop") == "random":
                raise DataError(f"data.params.{name}.params.crop is random, which cannot be cached (the crop changes "
                                "every step): use crop center or none with --cache_latents (data.params.cache_latents)")
        self.train_config, self.reg_config = train, reg
        self.instance: Dataset | None = None
        self.class_prior: Dataset | None = None

    @property
    def class_folder(self) -> str | None:
        """The folder of class images (`reg.params.data_root`), or None without prior preservation."""
        return None if self.reg_config is None else (self.reg_config.get("params") or {}).get("data_root")

    @property
    def class_word(self) -> str:
        """The class word of the class images, for generating missing ones."""
        return ((self.reg_config or {}).get("params") or {}).get("class_word", DEFAULT_CLASS_WORD)

    def missing_class_images(self) -> int:
        """How many class images must be generated before training to reach `num_class_images`."""
        if self.reg_config is None:
            return 0
        return max(0, self.num_class_images - count_images(self.class_folder))

    def setup(self, stage: str | None = None) -> None:
        """Build (and so check) the instance set, and the class set once no class image is missing."""
        instance_root = (self.train_config.get("params") or {}).get("data_root")
        if instance_root and self.class_folder and Path(instance_root).resolve() == Path(self.class_folder).resolve():
            raise DataError(f"--data_root and --reg_data_root are the same folder ({instance_root}): the class images "
                            "must be other pictures of the class, not the subject's photos (or generate them with "
                            "--num_class_images into a folder of their own)")
        if self.instance is None:
            self.instance = instantiate_from_config(self.train_config)
        if self.reg_config is not None and self.class_prior is None and not self.missing_class_images():
            self.class_prior = instantiate_from_config(self.reg_config)

    def datasets(self) -> dict[str, Dataset]:
        """The datasets built so far by their config key: `train`, and `reg` once no class image is missing."""
        return {name: dataset for name, dataset in (("train", self.instance), ("reg", self.class_prior))
                if dataset is not None}

    def train_dataloader(self) -> DataLoader:
        self.setup()
        if self.reg_config is not None and self.class_prior is None:
            raise RuntimeError(f"{self.missing_class_images()} class images are still missing in {self.class_folder}")
        if self.cache_latents and any(dataset.moments is None for dataset in self.datasets().values()):
            raise RuntimeError("cache_latents is set but the datasets have no cached moments: call "
                               "ldm.latent_cache.cache_latents before fit")
        dataset = self.instance if self.class_prior is None else InstanceClassPairs(self.instance, self.class_prior)
        if getattr(self.instance, "bucket_of", None) is not None:
            class_buckets = None if self.class_prior is None else [
                self.class_prior.target_size(k) for k in range(len(self.class_prior.paths))]
            batches = BucketBatches([self.instance.target_size(k) for k in range(len(self.instance.paths))],
                                    len(self.instance), class_buckets, self.batch_size)
            return DataLoader(dataset, batch_sampler=batches, num_workers=self.num_workers,
                              persistent_workers=self.num_workers > 0)
        return DataLoader(dataset, batch_size=self.batch_size, shuffle=True, num_workers=self.num_workers,
                          persistent_workers=self.num_workers > 0, drop_last=False)
