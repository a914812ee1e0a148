"""A callback for the distributed tests: each process writes a hash of its model's weights at the end of training
(`<folder>/rank<global rank>.sha256`), so that a test can see that every rank ends with the same weights."""
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
