"""Loading a weight file into a model: strict shape checks by model part, the meta-device build, the load report."""
import logging
import os
from collections import Counter
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Iterator, Mapping

import torch
from torch import nn

from ldm.checkpoint.files import (ADAPTER_KEY, LORA_PREFIXES, REQUIRED_GROUPS, UNET_PREFIX, CheckpointError,
                                  ShapeMismatchError, check_finite, ema_key, group_of, select_unet_weights,
                                  to_sd_layout)

logger = logging.getLogger(__name__)


@dataclass
class LoadReport:
    """What a load matched, ignored and filled in, counted by model part."""

    loaded: Counter = field(default_factory=Counter)
    unexpected: Counter = field(default_factory=Counter)
    examples: dict[str, str] = field(default_factory=dict)
    filled: list[str] = field(default_factory=list)
    ema_unet: bool = False  # the UNet was loaded from the file's EMA copy (model_ema.*)

    def ignored(self) -> str:
        """The tensors the model has no place for, by kind: "2 EMA tensors, 1 other (e.g. lora.up.weight)"."""
        return ", ".join(f"{n} {g} tensors" + (f" (e.g. {self.examples[g]})" if g == "other" else "")
                         for g, n in sorted(self.unexpected.items()))

    def summary(self) -> str:
        parts = [f"{group} {n}" for group, n in sorted(self.loaded.items())]
        text = "loaded " + ", ".join(parts) + (" (the UNet from the file's EMA weights)" if self.ema_unet else "")
        if self.unexpected:
            text += "; ignored " + self.ignored()
        return text


def _shape_problem(key: str, found: torch.Size, expected: torch.Size) -> str:
    hint = ""
    if key.endswith("attn2.to_k.weight") and found[-1] == 1024:
        hint = " (a Stable Diffusion 2 file? this tool needs a Stable Diffusion v1 checkpoint, context 768)"
    return f"{key}: file {tuple(found)} vs model {tuple(expected)}{hint}"


def check_compatible(model_state: Mapping[str, torch.Tensor], file_state: Mapping[str, torch.Tensor],
                     source: str) -> LoadReport:
    """Refuse files that would leave a model part random or whose shapes differ; count the rest."""
    shapes = [_shape_problem(k, v.shape, model_state[k].shape)
              for k, v in file_state.items() if k in model_state and v.shape != model_state[k].shape]
    if shapes:
        raise ShapeMismatchError(f"{source} does not match the model config in {len(shapes)} tensors, e.g. "
                                 + "; ".join(shapes[:3]), {k: tuple(v.shape) for k, v in file_state.items()})
    missing = Counter(group_of(k) for k in model_state if k not in file_state)
    expected = Counter(group_of(k) for k in model_state)
    lora = any(k.startswith(LORA_PREFIXES) or ADAPTER_KEY.search(k) for k in file_state)
    if lora and any(missing[group] for group in REQUIRED_GROUPS):
        raise CheckpointError(f"{source} is a LoRA file (or a LoRA run's last.ckpt), not a full SD v1 checkpoint: pass "
                              "the base model as the checkpoint and this file with --lora (sampling), or resume its "
                              "run with -r <run folder> (training)")
    for group in REQUIRED_GROUPS:
        if missing[group]:
            which = "has no" if missing[group] == expected[group] else f"lacks {missing[group]} of {expected[group]}"
            example = next(k for k in model_state if group_of(k) == group and k not in file_state)
            raise CheckpointError(f"{source} {which} {group} weights (e.g. {example}); is it a full SD v1 checkpoint?")
    extra = [k for k in file_state if k not in model_state]
    examples = {group_of(k): k for k in reversed(extra)}  # the first key of each kind
    return LoadReport(loaded=Counter(group_of(k) for k in file_state if k in model_state),
                      unexpected=Counter(group_of(k) for k in extra), examples=examples)


@contextmanager
def parameters_on_meta() -> Iterator[None]:
    """Build modules whose parameters live on the `meta` device: no memory and no random initialisation, for a model
    that `load_model_weights` fills from a file at once (buffers stay real: they are small, and some are computed)."""
    register = nn.Module.register_parameter

    def register_on_meta(module: nn.Module, name: str, param: nn.Parameter | None) -> None:
        register(module, name, param)
        if param is not None and param.device.type != "meta":
            module._parameters[name] = nn.Parameter(param.to("meta"), requires_grad=param.requires_grad)

    nn.Module.register_parameter = register_on_meta
    try:
        yield
    finally:
        nn.Module.register_parameter = register


def on_meta(model: nn.Module) -> list[str]:
    """The names of the parameters and buffers of `model` that have no data yet (on the `meta` device)."""
    return [name for name, tensor in (*model.named_parameters(), *model.named_buffers()) if tensor.is_meta]


def load_state(model: nn.Module, file_state: dict[str, torch.Tensor], path: str | os.PathLike,
               use_ema: bool = False) -> LoadReport:
    """Load the tensors read from the SD v1 file `path` into a LatentDiffusion; every UNet, VAE and text-encoder
    tensor must come from the file.

    A model built under `parameters_on_meta` takes the file's tensors themselves (cast to the model's dtypes), so
    that one copy of the weights is held, not two."""
    file_state = select_unet_weights(to_sd_layout(file_state), use_ema)
    model_state = model.state_dict()
    report = check_compatible(model_state, file_state, str(path))
    if use_ema:  # the file's EMA copies are the UNet now: used, not ignored
        report.unexpected.pop("EMA", None)
        report.ema_unet = True
    state = {k: v for k, v in file_state.items() if k in model_state}
    del file_state
    check_finite(state, str(path))
    ema_sources = {ema_key(k): k for k in model_state if k.startswith(UNET_PREFIX)}
    for key, unet_key in ema_sources.items():
        if key in model_state and key not in state:  # a fresh EMA starts from the loaded weights, in its own memory
            state[key] = state[unet_key].clone()
            report.filled.append(key)
    missing = [k for k in model_state if k not in state]
    assign = bool(on_meta(model))
    if assign:
        state = {k: v.to(model_state[k].dtype) for k, v in state.items()}
    model.load_state_dict(state, strict=False, assign=assign)
    empty = on_meta(model)
    if empty:
        raise CheckpointError(f"{path} has no values for {len(empty)} tensors of the model (e.g. {empty[0]}), which "
                              "would stay empty; is it a full SD v1 checkpoint for this config?")
    if missing:
        logger.info("%s: kept the config's values for %d buffers (%s)", path, len(missing), ", ".join(missing[:3]))
    if report.unexpected:
        logger.warning("%s: ignored %s", path, report.ignored())
    logger.info("%s: %s", path, report.summary())
    return report
