"""Callbacks for the distributed tests: each process writes a hash of its model's weights at the end of training
(`<folder>/rank<global rank>.sha256`), so that a test can see that every rank ends with the same weights, and what
it drew at its first step."""
import hashlib
from pathlib import Path

import pytorch_lightning as pl
import torch


def weights_hash(state_dict: dict[str, torch.Tensor]) -> str:
    digest = hashlib.sha256()
    for key in sorted(state_dict):
        digest.update(key.encode())
        digest.update(state_dict[key].detach().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()


class RankWeights(pl.Callback):
    def __init__(self, folder: str):
        self.folder = Path(folder)

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.folder.mkdir(parents=True, exist_ok=True)
        (self.folder / f"rank{trainer.global_rank}.sha256").write_text(weights_hash(pl_module.state_dict()))


class FirstDraws(pl.Callback):
    """Saves each process's first training timesteps and noise (`<folder>/draws<global rank>.pt`), and whether its
    DDP wrapper keeps the gradients as views of its buckets."""

    def __init__(self, folder: str):
        self.folder = Path(folder)
        self.draws: dict = {}

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        objective = pl_module.objective.noise
        self.draws["gradient_as_bucket_view"] = getattr(trainer.strategy.model, "gradient_as_bucket_view", None)
        for name in ("sample_timesteps", "sample_noise"):
            setattr(objective, name, self.recorder(name, getattr(objective, name)))

    def recorder(self, name: str, draw):
        def recorded(*args, **kwargs):
            value = draw(*args, **kwargs)
            self.draws.setdefault(name, value.detach().cpu().clone())
            return value
        return recorded

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.folder.mkdir(parents=True, exist_ok=True)
        torch.save(self.draws, self.folder / f"draws{trainer.global_rank}.pt")
