"""The only place that reads or writes weight files: safe .ckpt unpickling, .safetensors, SD-layout keys, atomic
writes."""
import logging
import os
import pickle
import re
import struct
import zipfile
from collections import Counter
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, BinaryIO, Iterator, Mapping

import numpy as np
import torch
from torch import nn

from ldm.modules.diffusionmodules.schedule import SCHEDULE_BUFFERS
from ldm.util import UserError, atomic_write

logger = logging.getLogger(__name__)

UNET_PREFIX = "model.diffusion_model."
TEXT_PREFIX = "cond_stage_model.transformer."
TEXT_MODEL_PREFIX = TEXT_PREFIX + "text_model."
EMA_PREFIX = "model_ema."
GROUPS = (("UNet", UNET_PREFIX), ("VAE", "first_stage_model."), ("text encoder", "cond_stage_model."),
          ("EMA", EMA_PREFIX))
REQUIRED_GROUPS = ("UNet", "VAE", "text encoder")
LORA_PREFIXES = ("lora_unet_", "lora_te_", "lora_te1_", "lora_te2_")  # kohya's; te1/te2 are SDXL's
IGNORED_KEYS = ("cond_stage_model.transformer.text_model.embeddings.position_ids",)


class CheckpointError(Exception):
    """A weight file that cannot be used, with a message meant for the user."""


class ShapeMismatchError(CheckpointError):
    """A file whose tensors have other shapes than the model config's; `file_shapes` lets callers look for one
    that fits."""

    def __init__(self, message: str, file_shapes: Mapping[str, tuple[int, ...]]):
        super().__init__(message)
        self.file_shapes = dict(file_shapes)


class _ReferencedByName:
    """Stands in for classes that SD v1 files name only as dictionary keys; no code of theirs is ever run."""


# Real SD v1 files (PyTorch Lightning 1.x) name these in their callback state; nothing else is allowed.
_SAFE_GLOBALS = [
    (_ReferencedByName, "pytorch_lightning.callbacks.model_checkpoint.ModelCheckpoint"),
    (np._core.multiarray.scalar, "numpy.core.multiarray.scalar"),
    np._core.multiarray.scalar,
    np.dtype,
    type(np.dtype(np.float64)),
]


def group_of(key: str) -> str:
    """The part of the model a state-dict key belongs to: a model part, "noise schedule" or "other"."""
    if key in SCHEDULE_BUFFERS:
        return "noise schedule"
    return next((name for name, prefix in GROUPS if key.startswith(prefix)), "other")


CONTROL_BYTES = frozenset(range(32)) - {9, 10, 13}  # never in text; every weight format starts with some


def _not_a_checkpoint(head: bytes) -> str | None:
    """Why a file that starts as text or holds nothing cannot be a checkpoint (a failed download), else None."""
    if not head:
        return "is empty (0 bytes): a failed download? Download it again"
    if CONTROL_BYTES.intersection(head):
        return None
    text = head.decode("utf-8", errors="replace")
    first = text.strip().splitlines()[0][:60] if text.strip() else ""
    if text.startswith("version https://git-lfs"):
        return "is a Git LFS pointer (a small text file), not the weights: fetch them with `git lfs pull`"
    if "<html" in text.lower() or text.lower().lstrip().startswith("<!doctype"):
        return (f"is not a checkpoint but a web page (it begins '{first}'): a failed download, or a login or error "
                "page saved in its place? Download the file again")
    return f"is not a checkpoint but a text file (it begins '{first}'): a failed download? Download it again"


def check_checkpoint_file(path: str | os.PathLike, hint: str = "") -> Path:
    """Refuse, with one line, a path that cannot be a weight file: missing, a folder (but a diffusers pipeline
    folder), empty, text or HTML."""
    path, hint = Path(path), f" ({hint})" if hint else ""
    if path.is_dir():
        if (path / "model_index.json").is_file():
            return path  # a diffusers pipeline folder, converted as it is read
        inside = sorted(p.name for p in path.iterdir() if p.suffix in (".ckpt", ".safetensors"))
        found = f"; it holds {', '.join(inside[:3])}: pass one of them" if inside else ""
        raise CheckpointError(f"{path} is a folder, not a checkpoint file{found}")
    if not path.is_file():
        raise CheckpointError(f"checkpoint not found: {path}{hint}")
    try:
        with open(path, "rb") as handle:
            reason = _not_a_checkpoint(handle.read(512))
    except OSError as err:
        raise CheckpointError(f"checkpoint not readable: {path} ({err.strerror}; check its permissions)") from None
    if reason:
        raise CheckpointError(f"{path} {reason}")
    return path


def check_finite(state: Mapping[str, torch.Tensor], source: str) -> None:
    """Refuse weights holding NaN or inf, naming the first such tensor (one pass over the floating tensors)."""
    for key, value in state.items():
        if value.is_floating_point() and not bool(torch.isfinite(value).all()):
            bad = int((~torch.isfinite(value)).sum())
            raise CheckpointError(f"{source}: tensor {key} holds {bad} NaN or inf values (of {value.numel()}); the "
                                  "file comes from a run that diverged, or is damaged: use an earlier checkpoint")


def _load_pickle(path: Path) -> Any:
    """torch.load with the allow-list, memory-mapped where the file's format allows it: tensors that are never used
    (the EMA copy of a full-EMA file, optimizer state) are then never read into memory."""
    with torch.serialization.safe_globals(_SAFE_GLOBALS):
        try:
            return torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        except RuntimeError as err:
            if "mmap" not in str(err):
                raise
            return torch.load(path, map_location="cpu", weights_only=True)  # a legacy (pre-zip) file


def _read_pickle(path: Path) -> Any:
    try:
        return _load_pickle(path)
    except pickle.UnpicklingError as err:
        lines = [line.strip() for line in str(err).splitlines()]
        reason = next((line for line in lines if "GLOBAL" in line or line.startswith("Unsupported global")), None)
        if reason is None:
            raise CheckpointError(f"{path}: not a checkpoint that can be read safely (not PyTorch's format, or "
                                  "damaged); is the download complete? If you trust the file, convert it to "
                                  ".safetensors") from None
        raise CheckpointError(
            f"{path}: refused to load, the file holds more than plain tensors ({reason}). Loading it would run "
            "code from the file. If you trust it, convert it once to .safetensors and use that file.") from None
    except (RuntimeError, EOFError, OSError, IndexError, ValueError) as err:
        raise CheckpointError(f"{path}: not a readable checkpoint ({err}); is the download complete?") from None


def _read_safetensors(path: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file
    try:
        return load_file(str(path), device="cpu")
    except Exception as err:  # safetensors raises its own error types for a damaged header or file
        raise CheckpointError(f"{path}: not a readable .safetensors file ({err})") from None


def _read_weights(path: str | os.PathLike) -> tuple[dict[str, torch.Tensor], list[str]]:
    """The tensors of a weight file, and the names of the other entries beside its `state_dict` (training state)."""
    path = check_checkpoint_file(path)
    if path.is_dir():
        from ldm.convert import read_diffusers_folder  # convert.py reads the parts' files through this module
        return read_diffusers_folder(path), []
    if path.suffix == ".safetensors":
        return _read_safetensors(path), []
    content, others = _read_pickle(path), []
    if isinstance(content, Mapping) and isinstance(content.get("state_dict"), Mapping):
        others = [str(k) for k in content if k != "state_dict"]
        content = content["state_dict"]
    if not isinstance(content, Mapping):
        raise CheckpointError(f"{path}: holds a {type(content).__name__}, not a state dict")
    return {k: v for k, v in content.items() if isinstance(v, torch.Tensor)}, others


def read_state_dict(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """The tensors of a .ckpt/.pt/.pth (under `state_dict` or flat) or .safetensors file, on the CPU; a diffusers
    pipeline folder's under SD v1 keys."""
    return _read_weights(path)[0]


def read_checkpoint(path: str | os.PathLike) -> dict[str, Any]:
    """A whole .ckpt (weights and training state such as optimizer moments), read as safely as any other file."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint not found: {path}")
    content = _read_pickle(path)
    if not isinstance(content, dict):
        raise CheckpointError(f"{path}: holds a {type(content).__name__}, not a checkpoint dictionary")
    return content


def to_sd_layout(state_dict: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Text-encoder keys in the SD layout (`...transformer.text_model.*`), whichever transformers wrote them."""
    result = {}
    for key, value in state_dict.items():
        if key.startswith(TEXT_PREFIX) and not key.startswith(TEXT_MODEL_PREFIX):
            key = TEXT_MODEL_PREFIX + key[len(TEXT_PREFIX):]
        if key not in IGNORED_KEYS:
            result[key] = value
    return result


def ema_key(unet_key: str) -> str:
    """LitEma's name for a UNet parameter: the path below `model.` with its dots removed."""
    return EMA_PREFIX + unet_key[len("model."):].replace(".", "")


def select_unet_weights(state_dict: dict[str, torch.Tensor], use_ema: bool) -> dict[str, torch.Tensor]:
    """With `use_ema`, replace the UNet weights by the file's EMA copy (`model_ema.*`)."""
    if not use_ema:
        return state_dict
    unet_keys = [k for k in state_dict if k.startswith(UNET_PREFIX)]
    missing = [k for k in unet_keys if ema_key(k) not in state_dict]
    if missing:
        raise CheckpointError(f"the file has no EMA weights for {len(missing)} of {len(unet_keys)} UNet tensors "
                              "(model_ema.*); load it without EMA")
    return {**state_dict, **{k: state_dict[ema_key(k)] for k in unet_keys}}


@dataclass
class LoadReport:
    """What a load matched, ignored and filled in, counted by model part."""

    loaded: Counter = field(default_factory=Counter)
    unexpected: Counter = field(default_factory=Counter)
    examples: dict[str, str] = field(default_factory=dict)
    filled: list[str] = field(default_factory=list)

    def ignored(self) -> str:
        """The tensors the model has no place for, by kind: "2 EMA tensors, 1 other (e.g. lora.up.weight)"."""
        return ", ".join(f"{n} {g} tensors" + (f" (e.g. {self.examples[g]})" if g == "other" else "")
                         for g, n in sorted(self.unexpected.items()))

    def summary(self) -> str:
        parts = [f"{group} {n}" for group, n in sorted(self.loaded.items())]
        text = "loaded " + ", ".join(parts)
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
    lora = any(k.startswith(LORA_PREFIXES) or ".lora_A." in k for k in file_state)
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


def load_model_weights(model: nn.Module, path: str | os.PathLike, use_ema: bool = False) -> LoadReport:
    """Load an SD v1 file into a LatentDiffusion; every UNet, VAE and text-encoder tensor must come from the file.

    A model built under `parameters_on_meta` takes the file's tensors themselves (cast to the model's dtypes), so
    that one copy of the weights is held, not two."""
    file_state = select_unet_weights(to_sd_layout(read_state_dict(path)), use_ema)
    model_state = model.state_dict()
    report = check_compatible(model_state, file_state, str(path))
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


ZIP_PREFIX = "archive/"
ZIP_ALIGNMENT = 64  # as torch's writer: tensors start at aligned offsets, so torch.load(mmap=True) maps them
PAD_HEADER_ID = 0x4246  # "FB", the zip extra field torch pads with
# torch 2.x also writes .format_version, .storage_alignment, byteorder and .data/serialization_id; AUTOMATIC1111's
# safe unpickler refuses any entry but <folder>/data.pkl, <folder>/version and <folder>/data/<n>, and
# torch.load needs none of the others (it assumes little-endian data and 64-byte alignment without them).
KEPT_RECORDS = re.compile(r"data\.pkl|data/\d+")


class _ZipRecords:
    """The record sink of torch's pickler, writing only the zip entries that other SD tools accept."""

    def __init__(self, handle: BinaryIO):
        self.handle = handle
        self.zip = zipfile.ZipFile(handle, "w", compression=zipfile.ZIP_STORED, allowZip64=True)

    def write_record(self, name: str, data: Any, nbytes: int) -> None:
        """Write entry `name` (bytes or a CPU storage) if other tools accept it."""
        if KEPT_RECORDS.fullmatch(name):
            self._write(name, data, nbytes)

    def _write(self, name: str, data: Any, nbytes: int) -> None:
        """One stored (uncompressed) zip entry, its data aligned to ZIP_ALIGNMENT bytes."""
        if isinstance(data, torch.UntypedStorage):
            data = memoryview(torch.empty(0, dtype=torch.uint8).set_(data).numpy())
        info = zipfile.ZipInfo(ZIP_PREFIX + name)
        info.file_size = nbytes
        zip64_extra = 20 if nbytes * 1.05 > zipfile.ZIP64_LIMIT else 0  # what zipfile adds to big entries
        header = 30 + len(info.filename.encode()) + zip64_extra
        pad = -(self.handle.tell() + header) % ZIP_ALIGNMENT
        if pad:
            pad += ZIP_ALIGNMENT if pad < 4 else 0
            info.extra = struct.pack("<HH", PAD_HEADER_ID, pad - 4) + bytes(pad - 4)
        with self.zip.open(info, "w") as entry:
            for start in range(0, nbytes, 1 << 26):
                entry.write(data[start:start + (1 << 26)])

    def close(self) -> None:
        self._write("version", b"3\n", 2)  # the format version torch 2.x writes
        self.zip.close()


def _torch_save_zip(obj: Any, path: Path) -> None:
    """torch.save's format (pickle protocol 2, storages as data/<n>) without the entries other tools refuse."""
    with open(path, "wb") as handle:
        records = _ZipRecords(handle)
        # torch.save's own pickler (private, with this signature since torch 2.1), given our record sink.
        torch.serialization._save(obj, records, pickle, 2, True)
        records.close()


def tensor_bytes(obj: Any) -> int:
    """The bytes of all tensors in a nested checkpoint dict (weights, optimizer state): its size on disk, about."""
    if isinstance(obj, torch.Tensor):
        return obj.numel() * obj.element_size() + ZIP_ALIGNMENT + 100
    if isinstance(obj, Mapping):
        return sum(tensor_bytes(v) for v in obj.values())
    if isinstance(obj, (list, tuple)):
        return sum(tensor_bytes(v) for v in obj)
    return 0


def remove_stale_temp_files(folder: str | os.PathLike) -> list[Path]:
    """Delete the temporary files of writes that were killed (`.NAME.tmp-PID`), saying so in one line."""
    stale = sorted(p for p in Path(folder).glob(".*.tmp-*") if re.fullmatch(r"\..+\.tmp-\d+", p.name))
    for path in stale:
        path.unlink(missing_ok=True)
    if stale:
        logger.info("%s: removed %d temporary files of interrupted writes (%s)", folder, len(stale),
                    ", ".join(p.name for p in stale[:3]))
    return stale


def save_checkpoint(checkpoint: Mapping[str, Any], path: str | os.PathLike) -> None:
    """Write a Lightning-style dict (with `state_dict`) as .ckpt, through a temporary file and a rename."""
    atomic_write(path, lambda tmp: _torch_save_zip(dict(checkpoint), tmp), tensor_bytes(checkpoint) + (1 << 20))


PRECISIONS = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}


def precision_dtype(name: str | None, what: str = "precision") -> torch.dtype | None:
    """The dtype of a precision name (fp16, bf16, fp32); None keeps each tensor's own dtype."""
    if name is None:
        return None
    if name not in PRECISIONS:
        raise UserError(f"{what} {name!r} is not a precision: use one of {', '.join(PRECISIONS)}")
    return PRECISIONS[name]


def precision_names(state_dict: Mapping[str, torch.Tensor]) -> str:
    """The precisions of a state dict's model weights (the noise schedule aside): "fp16", or "fp16 40, fp32 2"."""
    names = {dtype: name for name, dtype in PRECISIONS.items()}
    counts = Counter(names.get(v.dtype, str(v.dtype).replace("torch.", "")) for k, v in state_dict.items()
                     if v.is_floating_point() and group_of(k) != "noise schedule")
    if len(counts) == 1:
        return next(iter(counts))
    return ", ".join(f"{name} {n}" for name, n in counts.most_common())


def cast_weights(state_dict: Mapping[str, torch.Tensor], dtype: torch.dtype | None) -> dict[str, torch.Tensor]:
    """Contiguous CPU copies of the tensors, the floating-point ones cast to `dtype` (None: kept as they are); the
    noise schedule keeps its precision (in fp16, 1 - alphas_cumprod near t=0 would be ~15% off)."""
    tensors = {}
    for key, value in state_dict.items():
        value = value.detach().to("cpu").contiguous()
        if dtype is not None and value.is_floating_point() and group_of(key) != "noise schedule":
            value = value.to(dtype)
        tensors[key] = value
    return tensors


def save_weights(state_dict: Mapping[str, torch.Tensor], path: str | os.PathLike,
                 metadata: Mapping[str, str] | None = None, dtype: torch.dtype | None = None) -> None:
    """Write weights only, as .safetensors or as a .ckpt with a `state_dict`; `dtype` casts the floating-point model
    weights (see cast_weights)."""
    tensors = cast_weights(state_dict, dtype)
    path = Path(path)
    if path.suffix == ".safetensors":
        from safetensors.torch import save_file
        atomic_write(path, lambda tmp: save_file(tensors, str(tmp), metadata=dict(metadata or {})),
                     tensor_bytes(tensors) + (1 << 20))
    else:
        save_checkpoint({"state_dict": tensors}, path)


@dataclass
class ExportReport:
    """What `export_weights` wrote and what it left out."""

    path: Path
    tensors: int
    size: int
    precision: str
    ema: bool
    ema_left_out: int = 0
    training_state: list[str] = field(default_factory=list)

    def summary(self) -> str:
        """One line: "wrote out.ckpt: 2132.4 MB, 1142 tensors, fp16 (left out 686 EMA tensors)"."""
        left_out = [f"{self.ema_left_out} EMA tensors"] if self.ema_left_out else []
        if self.training_state:
            left_out.append(f"the training state ({', '.join(self.training_state)})")
        notes = ["UNet from the EMA weights"] if self.ema else []
        notes += ["left out " + " and ".join(left_out)] if left_out else []
        details = f" ({'; '.join(notes)})" if notes else ""
        return f"wrote {self.path}: {self.size / 1e6:.1f} MB, {self.tensors} tensors, {self.precision}{details}"


WEIGHT_SUFFIXES = (".ckpt", ".safetensors")


def export_weights(source: str | os.PathLike, dest: str | os.PathLike, dtype: torch.dtype | None = None,
                   use_ema: bool = False) -> ExportReport:
    """Write the weights of any SD v1 file (resumable, full-EMA, weights-only) as a weights-only SD v1 file in
    `dtype` (None: as stored), with the EMA UNet in place of the UNet's if `use_ema`; EMA copies are left out."""
    source, dest = Path(source), Path(dest)
    if dest.suffix not in WEIGHT_SUFFIXES:
        raise UserError(f"{dest}: the output must end in .ckpt or .safetensors (it chooses the format)")
    if dest.exists() and dest.resolve() == source.resolve():
        raise UserError(f"{dest} is the input file; write the pruned weights to another file")
    state, training_state = _read_weights(source)
    state = to_sd_layout(state)
    for group, prefix in GROUPS:
        if group in REQUIRED_GROUPS and not any(k.startswith(prefix) for k in state):
            raise CheckpointError(f"{source} has no {group} weights ({prefix}*); is it a full SD v1 checkpoint?")
    state = select_unet_weights(state, use_ema)
    weights = {k: v for k, v in state.items() if group_of(k) != "EMA"}
    check_finite(weights, str(source))
    tensors = cast_weights(weights, dtype)
    save_weights(tensors, dest)
    return ExportReport(path=dest, tensors=len(tensors), size=dest.stat().st_size, precision=precision_names(tensors),
                        ema=use_ema, ema_left_out=len(state) - len(weights), training_state=training_state)


def _lora_dim(tensors: Mapping[str, torch.Tensor], suffix: str) -> str:
    """kohya's metadata value for the rank (`lora_down.weight` rows) or alpha: one number, or "Dynamic" if mixed."""
    values = {float(v) if suffix == "alpha" else v.shape[0] for k, v in tensors.items() if k.endswith("." + suffix)}
    if not values and suffix == "alpha":  # no alphas: each is its module's rank
        return _lora_dim(tensors, "lora_down.weight")
    return str(values.pop()) if len(values) == 1 else "Dynamic"


def save_lora(tensors: Mapping[str, torch.Tensor], path: str | os.PathLike, base_hash: str,
              metadata: Mapping[str, str] | None = None, dtype: torch.dtype | None = None) -> None:
    """Write kohya-format LoRA tensors as .safetensors (atomically), with kohya's metadata (`ss_network_module`,
    `ss_network_dim`, `ss_network_alpha`) and the SHA-256 of the base checkpoint (`ss_new_sd_model_hash`)."""
    path = Path(path)
    if path.suffix != ".safetensors":
        raise UserError(f"{path}: a LoRA file is written as .safetensors (what other SD tools read)")
    bad = next((k for k in tensors if not k.startswith(LORA_PREFIXES)), None)
    if bad or not tensors:
        raise ValueError(f"not kohya LoRA tensors (e.g. {bad!r}): names start with {', '.join(LORA_PREFIXES)}")
    info = {**(metadata or {}), "ss_network_module": "networks.lora", "ss_new_sd_model_hash": base_hash,
            "ss_network_dim": _lora_dim(tensors, "lora_down.weight"), "ss_network_alpha": _lora_dim(tensors, "alpha")}
    save_weights(tensors, path, metadata=info, dtype=dtype)


def _safetensors_metadata(path: Path) -> dict[str, str]:
    from safetensors import safe_open
    with safe_open(str(path), framework="pt") as handle:
        return dict(handle.metadata() or {})


def _not_a_lora(path: Path, tensors: Mapping[str, torch.Tensor]) -> str:
    """Why a file whose tensors have no kohya LoRA name is not a LoRA file, for the user."""
    groups = {group_of(k) for k in tensors}
    if set(REQUIRED_GROUPS) <= groups:
        return f"{path} is a full SD v1 checkpoint, not a LoRA file: pass it as the base checkpoint (--ckpt)"
    example = next(iter(tensors), None)
    if example and "lora" in example.lower():
        return (f"{path} is a LoRA in another format (keys like {example}); this tool reads kohya-format files "
                "(keys lora_unet_*, lora_te_*), which A1111, ComfyUI and kohya's sd-scripts write")
    return f"{path} is not a LoRA file: none of its {len(tensors)} tensors is named lora_unet_* or lora_te_*"


def read_lora(path: str | os.PathLike) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """The tensors (as stored: fp32, fp16 or bf16) and metadata of a kohya-format LoRA file (.safetensors, or an
    old .pt/.ckpt read by the safe unpickler, which has no metadata)."""
    path = check_checkpoint_file(path)
    tensors = _read_weights(path)[0]
    if not any(k.startswith(LORA_PREFIXES) for k in tensors):
        raise CheckpointError(_not_a_lora(path, tensors))
    check_finite(tensors, str(path))
    return tensors, _safetensors_metadata(path) if path.suffix == ".safetensors" else {}


CONTROL_PREFIX = "control_model."  # lllyasviel's files; some carry a whole SD model beside it


def read_controlnet(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """The tensors of an original-layout SD 1.5 ControlNet file (.pth/.ckpt read by the safe unpickler, or
    .safetensors), keyed as the ControlNet module's state dict (without `control_model.`)."""
    path = check_checkpoint_file(path, "pass --controlnet path/to/control_v11p_sd15_canny.pth or .safetensors")
    tensors = _read_weights(path)[0]
    if any(k.startswith(CONTROL_PREFIX) for k in tensors):
        others = sum(not k.startswith(CONTROL_PREFIX) for k in tensors)
        if others:
            logger.info("%s: ignored %d tensors outside %s (the SD model it was trained on)", path, others,
                        CONTROL_PREFIX)
        tensors = {k[len(CONTROL_PREFIX):]: v for k, v in tensors.items() if k.startswith(CONTROL_PREFIX)}
    if "controlnet_cond_embedding.conv_in.weight" in tensors:
        raise CheckpointError(f"{path} is a diffusers-format ControlNet; this tool reads the original files "
                              "(control_v11p_sd15_*.pth or their .safetensors, keys control_model.*)")
    if "input_hint_block.0.weight" not in tensors:
        if any(k.startswith(LORA_PREFIXES) for k in tensors) or set(REQUIRED_GROUPS) <= {group_of(k) for k in tensors}:
            raise CheckpointError(f"{path} is not a ControlNet file but an SD model or a LoRA; pass it with --ckpt "
                                  "or --lora, and a ControlNet with --controlnet")
        raise CheckpointError(f"{path} is not a ControlNet file: it has no input_hint_block (keys like "
                              f"{next(iter(tensors), 'none')})")
    context = tensors.get("input_blocks.1.1.transformer_blocks.0.attn2.to_k.weight")
    if context is not None and context.shape[-1] == 1024:
        raise CheckpointError(f"{path} is a ControlNet for Stable Diffusion 2 (context 1024); SD v1 models need an "
                              "SD 1.5 ControlNet (context 768)")
    check_finite(tensors, str(path))
    return tensors


def load_controlnet_weights(net: nn.Module, path: str | os.PathLike) -> None:
    """Fill a ControlNet (built on the `meta` device or not) from an original-layout file; a missing part or a
    shape that differs is an error, never a silently random part."""
    tensors, expected = read_controlnet(path), net.state_dict()
    missing = [k for k in expected if k not in tensors]
    if missing:
        parts = sorted({k.split(".")[0] for k in missing})
        raise CheckpointError(f"{path} lacks {len(missing)} of the ControlNet's {len(expected)} tensors (in "
                              f"{', '.join(parts)}; e.g. {missing[0]}); is it a complete SD 1.5 ControlNet?")
    shapes = [f"{k}: file {tuple(tensors[k].shape)} vs model {tuple(v.shape)}"
              for k, v in expected.items() if tensors[k].shape != v.shape]
    if shapes:
        raise CheckpointError(f"{path} does not fit this model's UNet in {len(shapes)} tensors (a ControlNet for "
                              f"another model?), e.g. " + "; ".join(shapes[:2]))
    extra = [k for k in tensors if k not in expected]
    if extra:
        raise CheckpointError(f"{path} has {len(extra)} tensors this model's ControlNet does not (e.g. {extra[0]}): "
                              "a ControlNet for another UNet?")
    net.load_state_dict({k: tensors[k].to(v.dtype) for k, v in expected.items()}, assign=bool(on_meta(net)))
