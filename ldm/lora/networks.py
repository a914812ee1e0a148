"""The network kinds: LoRA and LyCORIS's DoRA, LoHa and LoKr. What peft trains for each, its tensors in a kohya /
LyCORIS file (`lora_down`/`lora_up` (+ `dora_scale`), `hada_w1_a`..., `lokr_w1`...), and the weight a file's
module gives at sampling, as LyCORIS, ComfyUI and A1111 compute it:

- LoRA (Hu et al. 2021): delta = up @ down * alpha / r.
- LoHa (FedPara, Hyeon-Woo et al. 2022): delta = (w1a @ w1b) * (w2a @ w2b) * alpha / r, r = rows of w1b.
- LoKr (Yeh et al. 2024, LyCORIS): delta = kron(w1, w2) * alpha / r, w1 and w2 full or a @ b, r = rows of the
  decomposed b; when both are full, the scale is 1 whatever the alpha (LyCORIS's rule, kept on purpose).
- DoRA (Liu et al. 2024, arXiv:2402.09353): W' = dora_scale * (W + delta) / ||W + delta||, the norm per output row
  when dora_scale is [out, 1] (what LyCORIS and peft train) or per input column when it is [1, in] (older LyCORIS,
  A1111). At a sampling scale s: W + s * (W' - W), as ComfyUI and A1111 do (s = 0 is the base exactly)."""
import json
from typing import Any, Mapping, Optional, Sequence

import torch
from torch import nn

from ldm.checkpoint import ADAPTER_KEY, CheckpointError

ADAPTER = "default"
NETWORKS = {"lora": "LoRA", "dora": "DoRA", "loha": "LoHa", "lokr": "LoKr"}
DOWN, UP, ALPHA, DORA = "lora_down.weight", "lora_up.weight", "alpha", "dora_scale"
LOHA = ("hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b")
LOKR = ("lokr_w1", "lokr_w1_a", "lokr_w1_b", "lokr_w2", "lokr_w2_a", "lokr_w2_b")
# peft's parameter names (adapter name left out) whose file names differ; the others keep theirs.
FILE_NAMES = {"lora_A.weight": DOWN, "lora_B.weight": UP, "lora_magnitude_vector.weight": DORA}


def peft_config(peft: Any, network: str, rank: int, alpha: float, module_names: Sequence[str], factor: int) -> Any:
    """peft's config of a network kind; the update is zero at first (LoKr initialised as LyCORIS does: w1 random,
    w2 zero)."""
    if network in ("lora", "dora"):
        return peft.LoraConfig(r=rank, lora_alpha=alpha, target_modules=list(module_names), lora_dropout=0.0,
                               init_lora_weights=True, bias="none", use_dora=network == "dora")
    if network == "loha":
        return peft.LoHaConfig(r=rank, alpha=alpha, target_modules=list(module_names), init_weights=True)
    return peft.LoKrConfig(r=rank, alpha=alpha, target_modules=list(module_names), decompose_factor=factor,
                           init_weights="lycoris")


def _adapter_parameters(layer: nn.Module) -> dict[str, nn.Parameter]:
    """A peft layer's adapter parameters by their file name (`lora_down.weight`, `hada_w1_a`, `lokr_w2`, ...)."""
    found = {}
    for name, param in layer.named_parameters():
        if ADAPTER_KEY.search("." + name):
            plain = name.replace(f".{ADAPTER}", "")
            found[FILE_NAMES.get(plain, plain)] = param
    return found


def both_full(layer: nn.Module) -> bool:
    """Whether a peft LoKr layer has full w1 and w2 (then LyCORIS scales by 1, not alpha / r)."""
    return ADAPTER in getattr(layer, "lokr_w1", {}) and ADAPTER in getattr(layer, "lokr_w2", {})


def layer_alpha(layer: nn.Module) -> float:
    """A peft layer's alpha."""
    return float((layer.lora_alpha if hasattr(layer, "lora_alpha") else layer.alpha)[ADAPTER])


def set_layer_alpha(layer: nn.Module, alpha: float) -> None:
    """Set a peft layer's alpha (its scale follows at the next `set_scale`); a LoKr with full w1 and w2 keeps its
    rank as alpha, so that its scale is 1 as in LyCORIS."""
    if both_full(layer):
        alpha = float(layer.r[ADAPTER])
    (layer.lora_alpha if hasattr(layer, "lora_alpha") else layer.alpha)[ADAPTER] = alpha


def layer_tensors(layer: nn.Module) -> dict[str, torch.Tensor]:
    """One peft layer's weights as a file's tensors (without the alpha): DoRA's magnitude as `dora_scale`
    [out, 1(, 1, 1)], the shape LyCORIS writes (its `wd_on_output`)."""
    out_features = layer.get_base_layer().weight.shape
    tensors = {}
    for name, param in _adapter_parameters(layer).items():
        value = param.detach().cpu()
        if name == DORA:
            value = value.reshape(out_features[0], *[1] * (len(out_features) - 1))
        tensors[name] = value.contiguous()
    return tensors


def load_layer(layer: nn.Module, parts: Mapping[str, torch.Tensor], name: str, source: str) -> None:
    """Copy a file's module into one peft layer: the same tensors in the same shapes, and the file's alpha."""
    params, expected = _adapter_parameters(layer), layer_tensors(layer)
    found = {key: value for key, value in parts.items() if key != ALPHA}
    shapes = {key: tuple(value.shape) for key, value in found.items()}
    wanted = {key: tuple(value.shape) for key, value in expected.items()}
    if shapes != wanted:
        raise CheckpointError(f"{source}: {name} holds {shapes}, but the model's {network_label(layer)} layer needs "
                              f"{wanted}; use the --network, --rank and --factor it was trained with")
    with torch.no_grad():
        for key, value in found.items():
            params[key].copy_(value.reshape(params[key].shape))
    set_layer_alpha(layer, float(parts[ALPHA]) if ALPHA in parts else float(layer.r[ADAPTER]))


def network_label(layer: nn.Module) -> str:
    """LoRA, DoRA, LoHa or LoKr: the kind of a peft layer."""
    return file_kind(_adapter_parameters(layer)) or type(layer).__name__


def file_kind(parts: Mapping[str, Any]) -> Optional[str]:
    """The label of a file's module (LoRA, DoRA, LoHa, LoKr; `LoHa (DoRA)` for LyCORIS's weight-decomposed LoHa or
    LoKr), by its keys; None when it is none of these."""
    if DOWN in parts and UP in parts:
        return "DoRA" if DORA in parts else "LoRA"
    base = None
    if all(key in parts for key in LOHA):
        base = "LoHa"
    elif ("lokr_w1" in parts or {"lokr_w1_a", "lokr_w1_b"} <= set(parts)) and \
            ("lokr_w2" in parts or {"lokr_w2_a", "lokr_w2_b"} <= set(parts)):
        base = "LoKr"
    return f"{base} (DoRA)" if base and DORA in parts else base


def _rank(parts: Mapping[str, torch.Tensor], name: str, source: str) -> Optional[int]:
    """The rank that alpha divides (None: a LoKr of full matrices, scale 1); a damaged pair of factors is an error."""
    pairs = [(a, b) for a, b in ((UP, DOWN), ("hada_w1_a", "hada_w1_b"), ("hada_w2_a", "hada_w2_b"),
                                 ("lokr_w1_a", "lokr_w1_b"), ("lokr_w2_a", "lokr_w2_b")) if a in parts and b in parts]
    for a, b in pairs:
        if parts[a].shape[1] != parts[b].shape[0]:
            raise CheckpointError(f"{source}: {name} has {a} {tuple(parts[a].shape)} and {b} "
                                  f"{tuple(parts[b].shape)}, whose ranks differ; the file is damaged")
    return parts[pairs[0][1]].shape[0] if pairs else None


def _factors(parts: Mapping[str, torch.Tensor]) -> torch.Tensor:
    """The unscaled update of a LoRA, LoHa or LoKr module as a 2-D [out, in * kernel] matrix in float32."""
    def matrix(key: str) -> torch.Tensor:
        return parts[key].float().flatten(1)

    if DOWN in parts:
        return matrix(UP) @ matrix(DOWN)
    if "hada_w1_a" in parts:
        return (matrix("hada_w1_a") @ matrix("hada_w1_b")) * (matrix("hada_w2_a") @ matrix("hada_w2_b"))
    w1 = matrix("lokr_w1") if "lokr_w1" in parts else matrix("lokr_w1_a") @ matrix("lokr_w1_b")
    w2 = matrix("lokr_w2") if "lokr_w2" in parts else matrix("lokr_w2_a") @ matrix("lokr_w2_b")
    return torch.kron(w1, w2)


def module_delta(parts: Mapping[str, torch.Tensor], shape: torch.Size, name: str, source: str) -> torch.Tensor:
    """A LoRA, LoHa or LoKr module's update with its alpha / r in float32, in the shape of the weight it adds to."""
    rank = _rank(parts, name, source)
    scale = 1.0 if rank is None else (float(parts[ALPHA]) if ALPHA in parts else float(rank)) / rank
    delta = _factors(parts) * scale
    if tuple(delta.shape) != (shape[0], shape[1:].numel()):
        raise CheckpointError(f"{source}: {name} ({file_kind(parts)}) changes a {tuple(delta.shape)} weight but the "
                              f"model's is {tuple(shape)}; is it for another model (SD 2, SDXL)?")
    return delta.reshape(shape)


def weight_decompose(weight: torch.Tensor, delta: torch.Tensor, magnitude: torch.Tensor, name: str,
                     source: str) -> torch.Tensor:
    """DoRA's weight: magnitude * (W + delta) / ||W + delta|| (float32), the norm along the axis whose size the
    magnitude has (+ float32's eps, as LyCORIS and ComfyUI add it)."""
    merged = weight + delta
    if magnitude.shape[0] == weight.shape[0] and magnitude.numel() == weight.shape[0]:
        norm = merged.flatten(1).norm(dim=1).reshape(-1, *[1] * (weight.dim() - 1))
    elif magnitude.dim() >= 2 and magnitude.shape[0] == 1 and magnitude.numel() == weight.shape[1]:
        norm = merged.transpose(0, 1).flatten(1).norm(dim=1).reshape(1, -1, *[1] * (weight.dim() - 2))
    else:
        raise CheckpointError(f"{source}: {name} has a dora_scale {tuple(magnitude.shape)} for a {tuple(weight.shape)} "
                              f"weight; expected [{weight.shape[0]}, 1] or [1, {weight.shape[1]}]")
    scale = magnitude.float().reshape(norm.shape) / (norm + torch.finfo(torch.float32).eps)
    return merged * scale


def merged_weight(weight: torch.Tensor, parts: Mapping[str, torch.Tensor], scale: float, name: str,
                  source: str) -> torch.Tensor:
    """The weight (float32) with one file module folded in at `scale`: W + s * delta, or for DoRA W + s * (W' - W)."""
    delta = module_delta(parts, weight.shape, name, source)
    if DORA not in parts:
        return weight + delta * scale
    return weight + (weight_decompose(weight, delta, parts[DORA], name, source) - weight) * scale


def network_metadata(network: str, rank: int, alpha: float, factor: int) -> dict[str, str]:
    """kohya's metadata of a network kind: `ss_network_module` (LoRA: networks.lora, the others: lycoris.kohya, as
    kohya's sd-scripts write them with LyCORIS), `ss_network_args` (LyCORIS's `algo`, `dora_wd`, `factor`),
    `ss_network_dim` and `ss_network_alpha`."""
    if network == "lora":
        return {}
    args = {"algo": "lora" if network == "dora" else network}
    if network == "dora":
        args["dora_wd"] = "True"
    if network == "lokr":
        args["factor"] = str(factor)
    return {"ss_network_module": "lycoris.kohya", "ss_network_args": json.dumps(args),
            "ss_network_dim": str(rank), "ss_network_alpha": str(float(alpha))}
