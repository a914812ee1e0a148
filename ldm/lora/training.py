"""LoRA training of a LatentDiffusion: the peft injection after the base weights load, the trained parameters, the
kohya-format files of the step checkpoints, and a `last.ckpt` that holds the LoRA weights only (with the optimizer
and loop state), checked on resume against the injected model. With `use_ema` the EMA averages the LoRA weights
only: the step files hold the averaged LoRA, last.ckpt the trained one and the average (`model_ema.*`)."""
import logging
from dataclasses import asdict
from pathlib import Path
from typing import Any, Optional

import torch
from torch import nn

from ldm.checkpoint import EMA_PREFIX, CheckpointError, read_lora, save_lora
from ldm.lora.layers import LoraOptions, inject_lora, is_lora_key, load_lora_tensors, lora_tensors
from ldm.lora.names import LoraNames
from ldm.lora.networks import NETWORKS, network_metadata
from ldm.util import file_sha256

logger = logging.getLogger(__name__)

CHECKPOINT_KEY = "lora"  # a LoRA run's last.ckpt: its LoraOptions, beside the LoRA-only state_dict


def is_ema(key: str) -> bool:
    return key.startswith(EMA_PREFIX)


def resumable_key(key: str) -> bool:
    """Whether a LoRA run's last.ckpt keeps a state-dict key: the adapter weights and their EMA."""
    return is_lora_key(key) or is_ema(key)


class LoraTraining:
    """Mixed into LatentDiffusion; `self.lora` (LoraOptions or None) comes from `model.params.lora`."""

    lora: Optional[LoraOptions]
    lora_names: Optional[LoraNames] = None  # set once injected
    frozen_precision: str
    adapter_ema: bool = False  # use_ema in a LoRA run: the EMA of the adapter weights starts once they are injected

    def inject_lora(self, unet_params: dict) -> None:
        """Wrap the target modules in LoRA layers (call after loading the base weights); only they train from now."""
        self.lora_names = LoraNames.from_unet_config(unet_params)
        modules = inject_lora(self, self.lora_names, **self.lora.injection())
        self.strict_loading = False  # last.ckpt holds the LoRA weights only; on_load_checkpoint checks them
        if self.adapter_ema:
            self.init_ema(self, include=is_lora_key)
        trained = sum(p.numel() for p in self.parameters() if p.requires_grad)
        text, skip = "", self.cond_stage_model.clip_skip
        if self.lora.text_encoder:
            reached = self.cond_stage_model.reached_layers
            text = " and the text encoder" + (f" (its layers 1-{reached}: clip_skip {skip} skips the rest)"
                                              if skip > 1 else "")
        factor = f", factor {self.lora.factor}" if self.lora.network == "lokr" else ""
        logger.info("%s rank %d (alpha %g%s, targets %s%s) on %d modules: %.2f M parameters train, the base stays "
                    "frozen", NETWORKS[self.lora.network], self.lora.rank, self.lora.alpha or self.lora.rank, factor,
                    self.lora.targets, text, len(modules), trained / 1e6)

    def frozen_base(self, device_type: str) -> list[nn.Module]:
        """The modules whose frozen base a LoRA run stores at the frozen dtype beside float32 LoRA weights: the UNet,
        and the text encoder when its LoRA trains; on an accelerator (the CPU keeps them in float32 unless
        `frozen_precision` names a dtype), none without LoRA."""
        if self.lora_names is None or (device_type == "cpu" and self.frozen_precision == "auto"):
            return []
        return [self.model] + ([self.cond_stage_model] if self.cond_stage_trainable else [])

    def trained_parameters(self, module: nn.Module) -> list[nn.Parameter]:
        """What the optimizer updates in `module`: all its parameters, or its LoRA weights only in a LoRA run (by
        name, so that a text encoder whose training stopped keeps its parameter group on resume)."""
        return [p for name, p in module.named_parameters() if self.lora_names is None or is_lora_key(name)]

    def load_lora_file(self, path: str | Path) -> None:
        """Load a kohya-format file (a run's step_N.safetensors) into the injected LoRA layers."""
        tensors, _ = read_lora(path)
        load_lora_tensors(self, tensors, self.lora_names, source=str(path))
        if self.use_ema:  # the file holds the average: it starts again from there
            self.model_ema.reset(self)

    def ema_source(self) -> nn.Module:
        """A LoRA run averages its LoRA weights, by their names in the whole model (the UNet's and the text
        encoder's)."""
        return self if self.lora_names is not None else super().ema_source()

    def save_lora_file(self, path: Path, dtype: Optional[torch.dtype] = None) -> None:
        """Write the LoRA as a kohya-format .safetensors file with the base checkpoint's name and SHA-256."""
        base = self.lora.base_checkpoint
        known = base is not None and Path(base).is_file()
        metadata = {"ss_base_model_version": "sd_v1", "ss_steps": str(self.global_step),
                    "ss_sd_model_name": Path(base).name if base else "",
                    **network_metadata(self.lora.network, self.lora.rank, self.lora.alpha or self.lora.rank,
                                       self.lora.factor)}
        save_lora(lora_tensors(self, self.lora_names), path, file_sha256(base) if known else "", metadata, dtype)

    @property
    def weights_suffix(self) -> str:
        """A LoRA run's step files are kohya-format LoRA files."""
        return ".safetensors" if self.lora_names is not None else super().weights_suffix

    def save_step_weights(self, path: Path, dtype: Optional[torch.dtype] = None,
                          shared_dtype: Optional[torch.dtype] = None, beside_resumable: bool = False) -> None:
        """A LoRA run writes its LoRA file (`path` as .safetensors, in `dtype`; with `use_ema`, the averaged LoRA) at
        every step file and beside every last.ckpt; other runs write the model's weights (DDPM.save_step_weights)."""
        if self.lora_names is None:
            super().save_step_weights(path, dtype, shared_dtype, beside_resumable)
            return
        with self.ema_scope():
            self.save_lora_file(path.with_suffix(".safetensors"), dtype)

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """A LoRA run's last.ckpt keeps the LoRA weights (and their EMA) only (the base is the file of
        `lora.base_checkpoint`)."""
        if self.lora_names is not None:
            checkpoint["state_dict"] = {k: v for k, v in checkpoint["state_dict"].items() if resumable_key(k)}
            checkpoint[CHECKPOINT_KEY] = asdict(self.lora)

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Refuse a last.ckpt of the other kind, or one whose LoRA modules differ from the injected ones."""
        if self.lora_names is None:
            if CHECKPOINT_KEY in checkpoint:
                raise CheckpointError("this checkpoint holds a LoRA run's weights only, but the config trains the "
                                      "whole model; resume it with its own run folder's configs")
            return
        if CHECKPOINT_KEY not in checkpoint:
            raise CheckpointError("the config trains LoRA, but this checkpoint is a full fine-tune's; resume it "
                                  "without the LoRA options")
        network = checkpoint[CHECKPOINT_KEY].get("network", "lora")  # checkpoints before --network are LoRA's
        if network != self.lora.network:
            raise CheckpointError(f"the checkpoint trains {NETWORKS.get(network, network)}, but the config "
                                  f"{NETWORKS[self.lora.network]}; resume it with --network {network}")
        expected = {k for k in self.state_dict() if resumable_key(k)}
        found = set(checkpoint["state_dict"])
        if expected != found:
            missing, extra = sorted(expected - found), sorted(found - expected)
            ema = " or was model.params.use_ema changed" if any(map(is_ema, missing + extra)) else ""
            raise CheckpointError(f"the checkpoint's LoRA does not fit the model: {len(missing)} LoRA weights missing"
                                  f"{f' (e.g. {missing[0]})' if missing else ''}, {len(extra)} unexpected"
                                  f"{f' (e.g. {extra[0]})' if extra else ''}; were other --lora_targets or --factor "
                                  f"used{ema}?")
