"""Prior preservation by the frozen model (`model.params.prior_preservation: frozen_model`, `--prior frozen_model`):
the class term's examples are the instance latents noised afresh under the class prompt, and their target is the base
model's own prediction there, so that no class image is needed (OneTrainer's prior model preservation, ai-toolkit's
output preservation).

A LoRA run switches its adapters off for that prediction: the same network, no copy. A full fine-tune keeps a frozen
copy of the UNet (and of the text encoder when it trains), made from the base weights when the run starts and read
again from the base checkpoint (`prior_base_checkpoint`) when it resumes. The copy is held outside the module tree,
so that the state_dict, the checkpoints, the optimizer, the EMA and DDP never see it."""
import copy
import logging
import time
from dataclasses import dataclass
from typing import Any, Mapping, Optional

import torch
from torch import nn

from ldm.checkpoint import CheckpointError, check_checkpoint_file, read_state_dict, select_unet_weights, to_sd_layout
from ldm.data.batch import CLASS_PREFIX, PRIOR_CAPTION_KEY
from ldm.lora.layers import adapters_off, cast_base
from ldm.modules.losses import FrozenModelTarget

logger = logging.getLogger(__name__)

FROZEN_MODEL = "frozen_model"


@dataclass
class FrozenCopy:
    """A full fine-tune's frozen base: the UNet (as its DiffusionWrapper) and the text encoder when that trains."""

    unet: nn.Module
    text: Optional[nn.Module]

    def parts(self) -> list[nn.Module]:
        return [self.unet] + ([self.text] if self.text is not None else [])

    def megabytes(self) -> float:
        """The memory of its parameters and buffers in MiB."""
        tensors = [t for part in self.parts() for t in (*part.parameters(), *part.buffers())]
        return sum(t.numel() * t.element_size() for t in tensors) / 2 ** 20

    def place(self, device: torch.device, dtype: Optional[torch.dtype]) -> None:
        """Move it to `device`, its floating-point weights cast to `dtype` (None: as they are)."""
        for part in self.parts():
            if dtype is not None:
                cast_base(part, dtype)
            part.to(device)


def frozen_twin(module: nn.Module) -> nn.Module:
    """A deep copy of `module` that never trains (a tokenizer it holds is shared, not copied)."""
    tokenizer = getattr(module, "tokenizer", None)
    memo = {} if tokenizer is None else {id(tokenizer): tokenizer}
    return copy.deepcopy(module, memo).requires_grad_(False).eval()


def load_part(module: nn.Module, state: Mapping[str, torch.Tensor], prefix: str, source: str) -> None:
    """Load the tensors of `state` under `prefix` into `module`, every one of its tensors from the file."""
    part = {key[len(prefix):]: value for key, value in state.items() if key.startswith(prefix)}
    missing = sorted(set(module.state_dict()) - set(part))
    if missing:
        raise CheckpointError(f"{source} has no values for {len(missing)} tensors of the frozen model (e.g. "
                              f"{prefix}{missing[0]}); is it the SD v1 checkpoint this run started from?")
    module.load_state_dict({key: part[key] for key in module.state_dict()})


class FrozenPrior:
    """Mixed into LatentDiffusion; `prior_base_checkpoint` and `prior_base_ema` name the full fine-tune's base (set
    by main.py from --actual_resume and --use_ema_weights, as LoRA's base_checkpoint)."""

    prior_base_checkpoint: Optional[str]
    prior_base_ema: bool
    frozen_copy: Optional[FrozenCopy] = None
    frozen_seconds: float = 0.0  # spent on the frozen model's predictions, and in how many steps
    frozen_calls: int = 0

    @property
    def uses_frozen_model(self) -> bool:
        return self.objective.prior.source == FROZEN_MODEL

    def start_frozen_prior(self, resumed: bool) -> None:
        """Make a full fine-tune's frozen copy (call after the weights the run starts from are loaded): from the
        model itself in a new run, from the base checkpoint in a resumed one; a no-op otherwise."""
        if not self.uses_frozen_model or self.lora_names is not None:
            return
        text = frozen_twin(self.cond_stage_model) if self.cond_stage_trainable else None
        self.frozen_copy = FrozenCopy(frozen_twin(self.model), text)
        if not resumed:
            return
        base = self.prior_base_checkpoint
        if not base:
            raise CheckpointError("the run's config names no base checkpoint for the frozen model of --prior "
                                  "frozen_model (model.params.prior_base_checkpoint): set it to the file the run "
                                  "started from")
        check_checkpoint_file(base, "the base checkpoint of the frozen model (model.params.prior_base_checkpoint); "
                              "restore it or point the key at a copy")
        state = select_unet_weights(to_sd_layout(read_state_dict(base)), self.prior_base_ema)
        load_part(self.frozen_copy.unet, state, "model.", base)
        if text is not None:
            load_part(text, state, "cond_stage_model.", base)
        logger.info("the frozen model of --prior frozen_model is read from the base checkpoint %s", base)

    def place_frozen_copy(self, device: torch.device, precision: str) -> None:
        """Put the frozen copy on the training device: in half precision on an accelerator (`frozen_precision`, or
        under `auto` the mixed precision's dtype, else fp16), as loaded (float32) on the CPU; log its cost."""
        if not self.uses_frozen_model:
            return
        if self.frozen_copy is None:
            if self.lora_names is None:
                raise RuntimeError("--prior frozen_model: call start_frozen_prior after loading the base weights")
            logger.info("prior preservation by the frozen model: its predictions are the same network's with the "
                        "LoRA switched off (no copy: 0 MB); one more forward without gradients per step")
            return
        dtype = self.frozen_dtype(precision)
        if dtype is None and self.frozen_precision == "auto" and device.type != "cpu":
            dtype = torch.float16
        self.frozen_copy.place(device, dtype)
        held = "the UNet" + (" and the text encoder" if self.frozen_copy.text is not None else "")
        logger.info("prior preservation by the frozen model: a frozen copy of %s holds %.1f MB (%s on %s); one more "
                    "forward without gradients per step", held, self.frozen_copy.megabytes(),
                    str(next(self.frozen_copy.unet.parameters()).dtype).removeprefix("torch."), device.type)

    def frozen_prior_inputs(self, batch: Mapping[str, Any], z: torch.Tensor, captions: list[str],
                            masks: Optional[torch.Tensor]) -> tuple[torch.Tensor, list[str], Optional[torch.Tensor],
                                                                    Optional[FrozenModelTarget]]:
        """With prior preservation by the frozen model: the instance latents again as the class examples (they get
        their own noise and timesteps), the class prompts after the captions, loss masks of 1 for them, and their
        target; otherwise everything as given and no target."""
        if not self.uses_frozen_model:
            return z, captions, masks, None
        if PRIOR_CAPTION_KEY not in batch or any(key.startswith(CLASS_PREFIX) for key in batch):
            raise ValueError(f"prior_preservation frozen_model needs batches with {PRIOR_CAPTION_KEY!r} and no class "
                             "examples (data.params.prior_captions true, data.params.reg null)")
        prompts = list(batch[PRIOR_CAPTION_KEY])
        if masks is not None:
            masks = torch.cat([masks, torch.ones_like(masks)])
        return torch.cat([z, z]), captions + prompts, masks, self.frozen_target(prompts, z.shape[0])

    @torch.no_grad()
    def frozen_target(self, prompts: list[str], first: int) -> FrozenModelTarget:
        """The frozen model's conditioning of the class prompts and its denoiser, timed."""
        start = self.frozen_clock(None)
        if self.frozen_copy is None:
            with adapters_off(self):
                cond = self.get_learned_conditioning(prompts)
        elif self.frozen_copy.text is not None:
            cond = self.frozen_copy.text.encode(prompts).float()
        else:
            cond = self.get_learned_conditioning(prompts)
        self.frozen_seconds += self.frozen_clock(start, cond)
        self.frozen_calls += 1
        return FrozenModelTarget(self.frozen_denoise, cond, first)

    def frozen_denoise(self, x: torch.Tensor, t: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
        """The base model's prediction: the LoRA switched off, or the frozen copy's, in float32."""
        start = self.frozen_clock(None)
        if self.frozen_copy is None:
            with adapters_off(self):
                prediction = self.apply_model(x, t, cond)
        else:
            dtype = next(self.frozen_copy.unet.parameters()).dtype
            prediction = self.frozen_copy.unet(x.to(dtype), t, context=cond.to(dtype)).float()
        self.frozen_seconds += self.frozen_clock(start, prediction)
        return prediction

    @staticmethod
    def frozen_clock(start: Optional[float], result: Optional[torch.Tensor] = None) -> float:
        """A wall-clock time (start None), or the seconds since `start` once the device has computed `result`."""
        if result is not None and result.device.type != "cpu":
            torch.accelerator.synchronize(result.device)
        now = time.perf_counter()
        return now if start is None else now - start

    def on_train_end(self) -> None:
        """Log the frozen model's share of the training time."""
        super().on_train_end()
        if self.uses_frozen_model and self.frozen_calls:
            logger.info("prior preservation by the frozen model: its predictions took %.3f s per step (mean of %d "
                        "steps)", self.frozen_seconds / self.frozen_calls, self.frozen_calls)
