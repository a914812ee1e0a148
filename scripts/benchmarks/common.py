"""What the benchmarks and the GPU self-check share: a config's model with seeded random weights written as an SD v1
checkpoint, synthetic photos to train on, and wall times that wait for the GPU."""
import hashlib
import logging
import statistics
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import torch
from omegaconf import DictConfig, OmegaConf
from PIL import Image

from benchmarks.reference import N_PHOTOS
from ldm.checkpoint import save_weights
from ldm.util import instantiate_from_config, synced_clock

logger = logging.getLogger(__name__)


def config_key(config: DictConfig) -> str:
    """A short hash of the config's model section: files written for one model config are found again."""
    return hashlib.sha1(OmegaConf.to_yaml(config.model).encode()).hexdigest()[:12]


def write_photos(work: Path, size: int) -> Path:
    """A few random PNGs at `size` in <work>/photos-<size>/{instance,class}."""
    folder = work / f"photos-{size}"
    rng = np.random.default_rng(0)
    for kind in ("instance", "class"):
        (folder / kind).mkdir(parents=True, exist_ok=True)
        for i in range(N_PHOTOS):
            path = folder / kind / f"{i}.png"
            if not path.is_file():
                Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8)).save(path)
    return folder


def random_checkpoint(config: DictConfig, work: Path) -> Path:
    """The config's model with seeded random weights as an SD v1 .ckpt, written once per model config."""
    path = work / f"random-{config_key(config)}.ckpt"
    if path.is_file():
        return path
    logger.info("writing a random-weight checkpoint of the config's model: %s", path)
    torch.manual_seed(0)
    save_weights(instantiate_from_config(config.model).state_dict(), path)
    return path


def seconds(run: Callable[[], object], device: torch.device) -> float:
    """Wall time of one call of `run`, waiting for the GPU to finish."""
    start = synced_clock(device)
    run()
    return synced_clock(device) - start


def median_seconds(runs: Sequence[Callable[[], object]], repeats: int, device: torch.device) -> list[float]:
    """Median time of each of `runs`, timed in turn (so a load change on the machine hits all), after a warm-up."""
    times: list[list[float]] = [[] for _ in runs]
    for k in range(repeats + 1):
        for run, bucket in zip(runs, times):
            elapsed = seconds(run, device)
            if k:
                bucket.append(elapsed)
    return [statistics.median(bucket) for bucket in times]


