"""Textual-inversion embedding files as AUTOMATIC1111 and ComfyUI read them: `.safetensors` holding one tensor
`emb_params` [N, width], and A1111's `.pt` ({"string_to_token": {"*": 265}, "string_to_param": {"*": [N, width]},
"name", "step", "sd_checkpoint", "sd_checkpoint_name"}), read by the safe unpickler."""
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping, Optional

import torch

from ldm.checkpoint.files import (LORA_PREFIXES, REQUIRED_GROUPS, CheckpointError, check_checkpoint_file,
                                  check_finite, group_of, read_checkpoint, read_weight_file)
from ldm.checkpoint.writing import save_checkpoint, save_weights
from ldm.util import UserError

EMB_PARAMS = "emb_params"  # the tensor's name in a .safetensors embedding (kohya's, read by A1111 and ComfyUI)
STAR_TOKEN = 265  # CLIP's id of "*", the placeholder of the original textual-inversion code; A1111 writes it
EMBEDDING_SUFFIXES = (".safetensors", ".pt", ".bin")


@dataclass
class EmbeddingFile:
    """An embedding file's vectors [N, width] (as stored) and the word it binds: a .pt's `name`, else the stem."""

    vectors: torch.Tensor
    name: str
    step: Optional[int] = None


def save_embedding(vectors: torch.Tensor, path: str | os.PathLike, name: str, step: int,
                   checkpoint_name: str = "", checkpoint_hash: str = "", dtype: Optional[torch.dtype] = None) -> None:
    """Write vectors [N, width] as .safetensors (`emb_params`, with the name and step in its metadata) or as A1111's
    .pt (atomically); `checkpoint_hash` is the base model's SHA-256 (A1111 keeps its first 10 characters)."""
    path, vectors = Path(path), vectors.detach().to("cpu", dtype or vectors.dtype).contiguous()
    if vectors.dim() != 2:
        raise ValueError(f"embedding vectors must be [N, width], got {tuple(vectors.shape)}")
    if path.suffix == ".safetensors":
        metadata = {"name": name, "step": str(step), "sd_checkpoint": checkpoint_hash[:10],
                    "sd_checkpoint_name": checkpoint_name}
        save_weights({EMB_PARAMS: vectors}, path, metadata=metadata)
    elif path.suffix == ".pt":
        save_checkpoint({"string_to_token": {"*": STAR_TOKEN}, "string_to_param": {"*": vectors}, "name": name,
                         "step": step, "sd_checkpoint": checkpoint_hash[:10] or None,
                         "sd_checkpoint_name": checkpoint_name or None}, path)
    else:
        raise UserError(f"{path}: an embedding file is written as .safetensors or .pt")


def read_embedding(path: str | os.PathLike) -> EmbeddingFile:
    """The vectors [N, width] of an A1111, ComfyUI, kohya or diffusers embedding file and the word it binds."""
    path = check_checkpoint_file(path, "--embedding takes a .safetensors or .pt textual-inversion embedding")
    if path.suffix == ".safetensors":
        tensors = read_weight_file(path)[0]
        vectors, name, step = _single_tensor(path, tensors), path.stem, None
    else:
        content = read_checkpoint(path)
        vectors, name, step = _from_pickle(path, content)
    if vectors.dim() == 1:  # one vector stored flat (some diffusers files)
        vectors = vectors[None]
    if vectors.dim() != 2 or not vectors.is_floating_point() or not len(vectors):
        raise CheckpointError(f"{path}: not an embedding (a tensor of shape {tuple(vectors.shape)}, expected "
                              "[vectors, width])")
    check_finite({"vectors": vectors}, str(path))
    return EmbeddingFile(vectors, name, step)


def adapter_kind(path: str | os.PathLike) -> str:
    """What a file to fold into a model holds, told by its content: "lora" (kohya names) or "embedding"; anything else
    is a CheckpointError that says what the file is."""
    if any(str(key).startswith(LORA_PREFIXES) for key in read_weight_file(path)[0]):
        return "lora"
    read_embedding(path)
    return "embedding"


def _single_tensor(path: Path, tensors: Mapping[str, torch.Tensor]) -> torch.Tensor:
    """The vectors of a .safetensors embedding: `emb_params`, or its only tensor (as A1111 reads it)."""
    if EMB_PARAMS in tensors:
        return tensors[EMB_PARAMS]
    if len(tensors) == 1:
        return next(iter(tensors.values()))
    raise CheckpointError(_not_an_embedding(path, tensors))


def _from_pickle(path: Path, content: Any) -> tuple[torch.Tensor, str, Optional[int]]:
    """A1111's (and the original textual-inversion code's) `string_to_param`, or diffusers' {word: tensor}."""
    if not isinstance(content, Mapping):
        raise CheckpointError(f"{path}: holds a {type(content).__name__}, not an embedding")
    params = content.get("string_to_param")
    if isinstance(params, Mapping) and len(params) == 1:
        step, name = content.get("step"), str(content.get("name") or path.stem)
        return next(iter(params.values())), name, step if isinstance(step, int) else None
    tensors = {k: v for k, v in content.items() if isinstance(v, torch.Tensor)}
    if len(tensors) == 1 and len(content) == 1:  # diffusers' learned_embeds.bin: {"<word>": tensor}
        word, vectors = next(iter(tensors.items()))
        return vectors, word, None
    if isinstance(content.get("state_dict"), Mapping):
        tensors = dict(content["state_dict"])
    raise CheckpointError(_not_an_embedding(path, tensors))


def _not_an_embedding(path: Path, tensors: Mapping[str, Any]) -> str:
    """Why a weight file is not an embedding, saying what it is when it is a model or a LoRA."""
    if any(str(k).startswith(LORA_PREFIXES) for k in tensors):
        return f"{path} is a LoRA file, not an embedding: pass it with --lora"
    if set(REQUIRED_GROUPS) <= {group_of(str(k)) for k in tensors}:
        return f"{path} is a full SD v1 checkpoint, not an embedding: pass it with --ckpt"
    return (f"{path} is not an embedding file: expected one tensor (emb_params) or A1111's string_to_param, found "
            f"{len(tensors)} tensors (e.g. {next(iter(tensors), 'none')})")
