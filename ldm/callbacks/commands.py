"""The commands a run prints for its user: the one that samples from its weights (the summary, the best step)."""
import shlex
from pathlib import Path
from typing import Optional

import pytorch_lightning as pl

from ldm.data.personalized import INSTANCE_TEMPLATE


def shell_quote(text: str) -> str:
    """A command-line argument: double quotes for a plain prompt, shell quoting for anything else."""
    if text and not set(text) & set('"$`\\!') and text.isprintable():
        return f'"{text}"' if shlex.quote(text) != text else text
    return shlex.quote(text)


def sample_command(trainer: pl.Trainer, pl_module: pl.LightningModule, weights: Path) -> Optional[str]:
    """The `stable_txt2img.py` command that samples the subject's prompt from `weights` of this run (for a LoRA run,
    the LoRA file of that name over its base), with the run's own config; None without one or without a subject."""
    configs = sorted((Path(trainer.default_root_dir) / "configs").glob("*-project.yaml"))
    instance = getattr(trainer.datamodule, "instance", None)
    if not configs or instance is None:
        return None
    prompt = INSTANCE_TEMPLATE.format(identifier=instance.identifier, class_word=instance.class_word)
    model = (f"--ckpt {shlex.quote(str(pl_module.lora.base_checkpoint))} --lora "
             f"{shlex.quote(str(weights.with_suffix('.safetensors')))}"
             if getattr(pl_module, "lora_names", None) is not None else f"--ckpt {shlex.quote(str(weights))}")
    return (f"python scripts/stable_txt2img.py {model} --config {shlex.quote(str(configs[-1]))} "
            f"--prompt {shell_quote(prompt)}")
