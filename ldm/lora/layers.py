"""LoRA (Hu et al. 2021, arXiv:2106.09685) and the LyCORIS kinds (DoRA, LoHa, LoKr; ldm/lora/networks.py) on a
LatentDiffusion: peft injection for training, kohya tensors in and out, and a plain weight merge (W += up @ down *
alpha / r * scale, or each kind's update) for sampling and merged checkpoints.

peft wraps each target module in a LoRA layer that holds the original module as `base_layer`, so an injected model's
`state_dict()` reads `...to_q.base_layer.weight` and `...to_q.lora_A.default.weight`: the SD v1 keys of the base
weights change. We therefore never save an injected model's state dict as is: `base_state_dict` gives the base
weights under their SD v1 keys, and `lora_tensors`/`load_lora_tensors` move the adapter weights in and out in kohya's
format. Load base weights before injecting (DoRA's magnitude starts as their norm). Sampling needs no peft:
`merge_lora` folds one file into plain weights; call it once per file."""
import logging
from collections import Counter
from contextlib import contextmanager
from dataclasses import dataclass, field, fields
from typing import Any, Iterator, Mapping, MutableMapping, Optional, Sequence

import torch
from torch import nn

from ldm.checkpoint import CheckpointError
from ldm.lora.names import TARGETS, LoraNames
from ldm.lora.networks import (ADAPTER, ADAPTER_KEY, ALPHA, DOWN, NETWORKS, both_full, file_kind, layer_alpha,
                               layer_tensors, load_layer, merged_weight, module_delta, network_label, peft_config,
                               set_layer_alpha)
from ldm.util import UserError, import_offline

logger = logging.getLogger(__name__)

# Keys of module kinds we do not apply, by the start of their suffix (LyCORIS and others).
OTHER_KINDS = {"lora_mid": "LoCon Tucker (lora_mid)", "hada_t": "LoHa Tucker (hada_t1)",
               "lokr_t": "LoKr Tucker (lokr_t2)", "oft_": "OFT (oft_)", "diff": "full diff (diff)",
               "w_norm": "norm (w_norm)", "a1.": "GLoRA (a1/a2/b1/b2)"}


def _peft():
    try:
        peft = import_offline("peft")  # peft imports bitsandbytes where installed: no hub, no kernel warning
    except ImportError:
        raise UserError("LoRA training needs peft: pip install 'peft>=0.13'") from None
    return peft


@dataclass
class LoraOptions:
    """A LoRA run's `model.params.lora`: the network kind, rank, alpha (default: the rank), LoKr's factor, the target
    set, whether the text encoder gets it too, and the base checkpoint that main.py loads before injecting (set from
    --actual_resume)."""

    rank: int = 4
    alpha: Optional[float] = None
    network: str = "lora"
    factor: int = -1
    targets: str = "transformer"
    text_encoder: bool = False
    base_checkpoint: Optional[str] = None
    base_ema: bool = False  # whether the base's EMA UNet weights were loaded (--use_ema_weights)

    @classmethod
    def from_config(cls, options: Optional[Mapping[str, Any]]) -> Optional["LoraOptions"]:
        """The options of a config's `lora` mapping (None or empty: no LoRA), checked."""
        if not options:
            return None
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(options) - known)
        if unknown:
            raise UserError(f"model.params.lora has unknown keys {unknown}; expected {', '.join(sorted(known))}")
        lora = cls(**options)
        if isinstance(lora.rank, bool) or not isinstance(lora.rank, int) or lora.rank < 1:
            raise UserError(f"LoRA rank {lora.rank!r} (--rank): expected a positive integer (4, 8 and 16 are usual)")
        if lora.alpha is not None and lora.alpha <= 0:
            raise UserError(f"LoRA alpha {lora.alpha} (--lora_alpha): expected a number above 0 (default: the rank)")
        if lora.targets not in TARGETS:
            raise UserError(f"LoRA targets {lora.targets!r} (--lora_targets): use one of {', '.join(TARGETS)}")
        check_network(lora.network, lora.factor)
        return lora

    def injection(self) -> dict[str, Any]:
        """The keyword arguments of `inject_lora`."""
        return {"rank": self.rank, "alpha": self.alpha, "targets": self.targets, "text_encoder": self.text_encoder,
                "network": self.network, "factor": self.factor}


def check_network(network: str, factor: int) -> None:
    """Refuse an unknown network kind, or a factor (LoKr's) for another kind or one below 1 (-1: LyCORIS's default)."""
    if network not in NETWORKS:
        raise UserError(f"network {network!r} (--network): use one of {', '.join(NETWORKS)}")
    if isinstance(factor, bool) or not isinstance(factor, int) or (factor < 1 and factor != -1):
        raise UserError(f"LoKr factor {factor!r} (--factor): expected -1 (balanced, LyCORIS's default) or a positive "
                        "integer")
    if factor != -1 and network != "lokr":
        raise UserError(f"--factor {factor} is LoKr's (how the Kronecker product splits each weight); it does not "
                        f"apply to --network {network}")


@dataclass
class LoraReport:
    """What a LoRA file applied and what it holds that we do not apply, counted by module."""

    source: str
    unet: int = 0
    text: int = 0
    skipped: Counter = field(default_factory=Counter)
    kinds: Counter = field(default_factory=Counter)  # applied modules by kind: LoRA, DoRA, LoHa, LoKr

    def summary(self) -> str:
        """One line: "a.safetensors: applied 140 modules (128 UNet, 12 text encoder); not applied: 36 LoCon ..."
        (with "140 LoHa" after the text encoder's count when the file holds other kinds than LoRA)."""
        kinds = ", ".join(f"{n} {kind}" for kind, n in sorted(self.kinds.items()))
        kinds = "" if set(self.kinds) <= {"LoRA"} else "; " + kinds
        text = (f"{self.source}: applied {self.unet + self.text} modules ({self.unet} UNet, {self.text} text "
                f"encoder{kinds})")
        if self.skipped:
            text += "; not applied: " + ", ".join(f"{n} {kind}" for kind, n in sorted(self.skipped.items()))
        return text


def group_modules(tensors: Mapping[str, torch.Tensor]) -> dict[str, dict[str, torch.Tensor]]:
    """A LoRA file's tensors by module: `{name: {"lora_down.weight": ..., "lora_up.weight": ..., "alpha": ...}}`."""
    modules: dict[str, dict[str, torch.Tensor]] = {}
    for key, value in tensors.items():
        name, _, suffix = key.partition(".")
        modules.setdefault(name, {})[suffix] = value
    return modules


def _kind(parts: Mapping[str, torch.Tensor], known: bool) -> str | None:
    """Why a file's module is not applied (its kind), or None for a LoRA, DoRA, LoHa or LoKr on a module we have."""
    other = next((kind for start, kind in OTHER_KINDS.items() for suffix in parts if suffix.startswith(start)), None)
    if other:
        return other
    kind = file_kind(parts)
    if kind is None:
        return "other (" + ", ".join(sorted(parts)) + ")"
    if DOWN in parts and parts[DOWN].ndim == 4 and parts[DOWN].shape[2:] != (1, 1) and not known:
        return "LoCon convs (3x3)"  # a ResBlock's is known to merge_lora, which applies it
    return None if known else f"{kind} on modules outside the UNet's transformers and the text encoder"


def _split(tensors: Mapping[str, torch.Tensor], lookup: Mapping[str, str],
           source: str) -> tuple[dict[str, dict[str, torch.Tensor]], LoraReport]:
    """The file's modules we apply (by our module name), and a report that counts them and the others."""
    report, applied = LoraReport(source), {}
    for name, parts in group_modules(tensors).items():
        kind = _kind(parts, name in lookup)
        if kind:
            report.skipped[kind] += 1
            continue
        ours = lookup[name]
        if ours in applied:
            raise CheckpointError(f"{source}: names module {ours} twice (e.g. as {name}); which one to use is unclear")
        applied[ours] = parts
        report.kinds[file_kind(parts)] += 1
        if ours.startswith("model."):
            report.unet += 1
        else:
            report.text += 1
    if not applied:
        raise CheckpointError(f"{source} changes no module of this model ({report.summary().split('; ')[-1]}); "
                              "is it a LoRA for Stable Diffusion v1?")
    return applied, report


def _log(report: LoraReport) -> None:
    """The report's line: a warning when the file holds modules we do not apply, so that none goes unnoticed."""
    (logger.warning if report.skipped else logger.info)("%s", report.summary())


def lora_delta(parts: Mapping[str, torch.Tensor], shape: torch.Size, name: str, source: str) -> torch.Tensor:
    """A file module's update in float32 (LoRA: up @ down * alpha / r; LoHa, LoKr: networks.module_delta), in the
    shape of the weight it adds to: [out, in], [out, in, 1, 1], or a LoCon's [out, in, 3, 3] (down [r, in, 3, 3], up
    [out, r, 1, 1]); DoRA's dora_scale is not applied here."""
    return module_delta(parts, shape, name, source)


def merge_lora(state: MutableMapping[str, torch.Tensor], tensors: Mapping[str, torch.Tensor], names: LoraNames,
               scale: float = 1.0, source: str = "LoRA") -> LoraReport:
    """Fold one kohya or LyCORIS file into plain SD v1 weights in place (W += up @ down * alpha / r * scale; LoHa,
    LoKr and DoRA as ldm/lora/networks.py computes them): a model's `state_dict()` (which shares the parameters'
    memory) or a checkpoint's tensors; never an injected model."""
    if any(".base_layer." in k for k in state):
        raise ValueError("merge_lora needs plain weights, not a model with peft LoRA layers (use set_lora_scale)")
    weights = {k[:-len(".weight")]: k for k in state if k.endswith(".weight")}
    applied, report = _split(tensors, names.lookup(weights), source)
    with torch.no_grad():
        for name, parts in applied.items():
            weight = state[weights[name]]
            weight.copy_(merged_weight(weight.float(), {k: v.to(weight.device) for k, v in parts.items()}, scale,
                                       name, source))
    _log(report)
    return report


def check_rank(model: nn.Module, module_names: Sequence[str], rank: int) -> None:
    """Refuse a rank above the width (the smaller of in and out features) of the narrowest target module: past it a
    LoRA adds parameters, not capacity (and --rank 100000 would build billions of them)."""
    modules = dict(model.named_modules())
    widths = {name: (getattr(modules[name], "in_features", None) or modules[name].in_channels,
                     getattr(modules[name], "out_features", None) or modules[name].out_channels)
              for name in module_names}
    narrowest = min(widths, key=lambda name: min(widths[name]))
    if rank > min(widths[narrowest]):
        features = "x".join(map(str, widths[narrowest]))
        raise UserError(f"LoRA rank {rank} (--rank) is above the width of the narrowest target module, {narrowest} "
                        f"({features}): use at most {min(widths[narrowest])} (4, 8 and 16 are usual)")


def inject_lora(model: nn.Module, names: LoraNames, rank: int = 4, alpha: float | None = None,
                targets: str = "transformer", text_encoder: bool = False, network: str = "lora",
                factor: int = -1) -> list[str]:
    """Wrap the target modules of a LatentDiffusion in peft layers of a network kind (lora, dora, loha, lokr) and
    return their names; only the adapter weights then train. LoRA is initialised as kohya's (down Kaiming-uniform, up
    zero), every kind so that the model is unchanged at first. The text encoder's layers after its clip_skip one get
    none: they never reach the conditioning. A LoKr layer of full w1 and w2 gets scale 1, as in LyCORIS."""
    if isinstance(rank, bool) or not isinstance(rank, int) or rank < 1:
        raise UserError(f"LoRA rank {rank!r}: expected a positive integer (4, 8 and 16 are usual)")
    check_network(network, factor)
    text_layers = model.cond_stage_model.reached_layers if text_encoder else None
    module_names = names.targets((n for n, _ in model.named_modules()), targets, text_encoder, text_layers)
    if not module_names:
        raise UserError("no module to put LoRA on: the model is not a LatentDiffusion with SD v1 transformers")
    check_rank(model, module_names, rank)
    peft = _peft()
    config = peft_config(peft, network, rank, rank if alpha is None else alpha, module_names, factor)
    peft.inject_adapter_in_model(config, model, adapter_name=ADAPTER)
    for layer in lora_layers(model).values():
        if both_full(layer):
            set_layer_alpha(layer, float(rank))
            layer.set_scale(ADAPTER, 1.0)
    return module_names


def lora_layers(model: nn.Module) -> dict[str, nn.Module]:
    """The peft adapter layers (any network kind) of an injected model, by our module name."""
    layer = _peft().tuners.tuners_utils.BaseTunerLayer
    return {name: module for name, module in model.named_modules() if isinstance(module, layer)}


def lora_tensors(model: nn.Module, names: LoraNames) -> dict[str, torch.Tensor]:
    """The injected network as kohya / LyCORIS tensors, a scalar `.alpha` per module: LoRA `<name>.lora_down.weight`
    [r, in(, 1, 1)] and `.lora_up.weight` [out, r(, 1, 1)] (DoRA: + `.dora_scale` [out, 1(, 1, 1)]), LoHa
    `.hada_w1_a` [out, r], `.hada_w1_b` [r, in], `.hada_w2_a`, `.hada_w2_b`, LoKr `.lokr_w1` (or `_a`/`_b`) and
    `.lokr_w2` (or `_a`/`_b`)."""
    tensors = {}
    for name, layer in lora_layers(model).items():
        kohya = names.kohya(name)
        tensors.update({f"{kohya}.{key}": value for key, value in layer_tensors(layer).items()})
        tensors[f"{kohya}.{ALPHA}"] = torch.tensor(layer_alpha(layer))
    return tensors


def load_lora_tensors(model: nn.Module, tensors: Mapping[str, torch.Tensor], names: LoraNames,
                      source: str = "LoRA") -> LoraReport:
    """Load a kohya-format file into an injected model: every injected module must be in it, of the same kind and
    shapes; each module keeps the file's alpha. Modules of the file that we do not apply are counted in the report."""
    layers = lora_layers(model)
    applied, report = _split(tensors, names.lookup(layers), source)
    missing = sorted(set(layers) - set(applied))
    if missing:
        raise CheckpointError(f"{source} has no LoRA for {len(missing)} of the {len(layers)} injected modules "
                              f"(e.g. {names.kohya(missing[0])}); were other --lora_targets used for it?")
    for name, parts in applied.items():
        layer, kohya = layers[name], names.kohya(name)
        if file_kind(parts) != network_label(layer):
            raise CheckpointError(f"{source}: {kohya} is {file_kind(parts)}, but the model trains "
                                  f"{network_label(layer)}: use --network {_flag(file_kind(parts))}")
        if DOWN in parts and parts[DOWN].shape[0] != layer.r[ADAPTER]:
            raise CheckpointError(f"{source}: {kohya} has rank {parts[DOWN].shape[0]}, the model's LoRA rank "
                                  f"{layer.r[ADAPTER]}: use --rank {parts[DOWN].shape[0]}")
        load_layer(layer, parts, kohya, source)
    set_lora_scale(model, 1.0)
    _log(report)
    return report


def _flag(kind: str) -> str:
    """The --network value of a file module's kind label."""
    return next((flag for flag, label in NETWORKS.items() if label == kind), kind)


def set_lora_scale(model: nn.Module, scale: float) -> None:
    """Scale every injected network as peft does: delta * scale (LoRA: up @ down * alpha / r * scale; 0: the base
    model exactly; DoRA renormalises W + delta * scale, which `merge_lora` at a scale does not)."""
    for layer in lora_layers(model).values():
        layer.set_scale(ADAPTER, scale)


@contextmanager
def adapters_off(model: nn.Module) -> Iterator[None]:
    """The base model exactly for the block: every injected layer computes its base layer only (peft's switch, which
    skips the adapter's branch, and holds for kinds where a scale of 0 would not give the base, such as DoRA); which
    adapter weights train is put back after it."""
    layers = list(lora_layers(model).values())
    trains = [(param, param.requires_grad) for layer in layers for param in layer.parameters()]
    try:
        for layer in layers:
            layer.enable_adapters(False)
        yield
    finally:
        for layer in layers:
            layer.enable_adapters(True)
        for param, flag in trains:  # peft's switch sets them all trainable again; a stopped text encoder's are not
            param.requires_grad_(flag)


def is_lora_key(key: str) -> bool:
    """Whether a state-dict key of an injected model names an adapter weight of any network kind (peft's `lora_A`,
    `lora_B`, DoRA's `lora_magnitude_vector`, LoHa's `hada_w*`, LoKr's `lokr_w*`)."""
    return bool(ADAPTER_KEY.search(key))


def cast_base(module: nn.Module, dtype: torch.dtype) -> None:
    """Store a module's floating-point weights and buffers in `dtype`, except its LoRA weights (those of an
    injected module keep their own dtype, so that they train in float32 on a half-precision base)."""
    for name, param in module.named_parameters():
        if param.is_floating_point() and not is_lora_key(name):
            param.data = param.data.to(dtype)
    for part in module.modules():
        for key, buffer in part._buffers.items():
            if buffer is not None and buffer.is_floating_point():
                part._buffers[key] = buffer.to(dtype)


def base_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """An injected model's base weights under their SD v1 keys (peft's `.base_layer` undone, LoRA weights left out)."""
    return {key.replace(".base_layer.", "."): value for key, value in model.state_dict().items()
            if not is_lora_key(key)}

