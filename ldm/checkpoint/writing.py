"""Writing weight files: .ckpt in the zip layout that A1111's safe unpickler accepts, .safetensors, precisions,
atomic writes."""
import logging
import os
import pickle
import re
import struct
import zipfile
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, BinaryIO, Mapping

import torch

from ldm.checkpoint.files import group_of
from ldm.util import UserError, atomic_write

logger = logging.getLogger(__name__)


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
