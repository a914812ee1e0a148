"""Small helpers shared by the whole package: the config factory, parameter counting, safe file writes, peak
memory, and imports of optional packages that stay off the Hugging Face hub (bitsandbytes, imported on a CPU with
AVX-512 bf16, asks the hub for a 4-bit matmul kernel that the 8-bit optimizer never uses)."""
import errno
import functools
import gc
import hashlib
import importlib
import json
import logging
import math
import os
import shutil
import stat
import sys
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path
from types import ModuleType
from typing import Any, Callable, Iterator, Mapping, Optional, Sequence

import torch

FLOAT32_MATMUL_PRECISION = "high"  # TF32 matmuls on GPUs that have them: what main.py trains with
HUB_OFFLINE_ENV = "HF_HUB_OFFLINE"
# what bitsandbytes logs when the hub kernel is not fetched: noise, since only its 4-bit layers would use it
UNUSED_KERNEL_LOGGER = "bitsandbytes.backends.cpu.ops"
UNUSED_KERNEL_WARNING = "Failed to load CPU gemm_4bit_forward"
START_TIME_ENV = "STEP_TIMER_START"  # time.time() at which a benchmark launched this process (callbacks/timing.py)


class UserError(Exception):
    """Bad input the user can fix; command lines print the message as one line and exit with status 1."""


class DiskFullError(UserError):
    """Not enough free space for a file; the message names the file, what it needs and what is free."""

    def __init__(self, path: str | os.PathLike, needed: int, free: int):
        self.path, self.needed, self.free = Path(path), needed, free
        super().__init__(f"not enough disk space for {self.path}: it needs about {format_bytes(needed)}, "
                         f"{format_bytes(free)} free")


def get_obj_from_str(path: str) -> Any:
    """Import `package.module.Name` and return `Name`."""
    module, name = path.rsplit(".", 1)
    return getattr(importlib.import_module(module), name)


def instantiate_from_config(config: Mapping, **extra: Any) -> Any:
    """Build `target(**params, **extra)` from a `target:` / `params:` mapping."""
    if "target" not in config:
        raise KeyError(f"config has no 'target' to instantiate: {dict(config)}")
    unknown = set(config) - {"target", "params", "base_learning_rate"}  # the lr sits beside target in model configs
    if unknown:
        raise KeyError(f"config for {config['target']} has unknown keys {sorted(unknown)}; expected 'target' and 'params'")
    params = dict(config.get("params") or {})
    return get_obj_from_str(config["target"])(**params, **extra)


def read_json(path: str | os.PathLike) -> Any:
    """A user's JSON file; a malformed or non-UTF-8 one is a UserError naming it."""
    try:
        return json.loads(Path(path).read_text(encoding="utf-8"))
    except UnicodeDecodeError:
        raise UserError(f"{path}: not a UTF-8 text file") from None
    except json.JSONDecodeError as err:
        raise UserError(f"{path}: malformed JSON ({err})") from None


def count_params(module: torch.nn.Module) -> int:
    """Number of parameters of a module (works on the meta device)."""
    return sum(p.numel() for p in module.parameters())


def format_bytes(n: float) -> str:
    """A byte count for people: 512 B, 12.3 kB, 4.3 GB."""
    units = ("B", "kB", "MB", "GB", "TB")
    power = min(int(math.log10(max(n, 1)) // 3), len(units) - 1)
    return f"{n:.0f} B" if power == 0 else f"{n / 1000 ** power:.1f} {units[power]}"


# the GPU peaks of closed spans (span_peak), per device, since reset_peak_memory
_folded_peaks: dict[torch.device, tuple[int, int]] = {}


def free_memory(device: torch.device) -> None:
    """On a GPU: collect garbage and hand the caching allocator's unused blocks back to the driver (on a CPU freed
    tensors go back at once, and a full collection costs a quarter of a second for nothing)."""
    if device.type == "cuda":
        gc.collect()
        torch.cuda.empty_cache()


def peak_rss_bytes() -> Optional[int]:
    """The process's peak resident memory so far, or None where the resource module is missing (Windows)."""
    try:
        import resource
    except ImportError:
        return None
    scale = 1 if sys.platform == "darwin" else 1024  # ru_maxrss is in bytes on macOS, kilobytes on Linux
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * scale


def peak_memory_stats(device: torch.device) -> dict[str, Optional[int]]:
    """The peak memory since the last `reset_peak_memory`: the process's peak RSS, and on a GPU the peak bytes the
    tensors held (allocated) and the caching allocator held (reserved, what the card must have), the peaks of the
    spans that `span_peak` closed included."""
    cuda = device.type == "cuda"
    folded = _folded_peaks.get(device, (0, 0))
    return {"peak_rss_bytes": peak_rss_bytes(),
            "cuda_max_allocated_bytes": max(folded[0], torch.cuda.max_memory_allocated(device)) if cuda else None,
            "cuda_max_reserved_bytes": max(folded[1], torch.cuda.max_memory_reserved(device)) if cuda else None}


def peak_memory_text(device: torch.device) -> str:
    """The peak memory for people: `allocated 5.2 GB, reserved 5.8 GB (CUDA)` on a GPU, else the peak RSS."""
    stats = peak_memory_stats(device)
    if stats["cuda_max_allocated_bytes"] is not None:
        return (f"allocated {format_bytes(stats['cuda_max_allocated_bytes'])}, reserved "
                f"{format_bytes(stats['cuda_max_reserved_bytes'])} (CUDA)")
    rss = stats["peak_rss_bytes"]
    return "unknown" if rss is None else f"{format_bytes(rss)} (process peak RSS)"


def synced_clock(device: torch.device) -> float:
    """time.perf_counter() once the device has finished its queued work (a CUDA GPU runs asynchronously)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter()


def reset_peak_memory(device: torch.device) -> None:
    """Start the GPU's peak counters afresh (the process's peak RSS cannot be reset)."""
    if device.type == "cuda":
        _folded_peaks.pop(device, None)
        torch.cuda.reset_peak_memory_stats(device)


def span_peak(device: torch.device) -> tuple[int, int]:
    """The GPU's (allocated, reserved) peak since the last span closed (one training step), then a fresh count for
    the next; `peak_memory_stats` still reports the peak since `reset_peak_memory`."""
    peak = (torch.cuda.max_memory_allocated(device), torch.cuda.max_memory_reserved(device))
    folded = _folded_peaks.get(device, (0, 0))
    _folded_peaks[device] = (max(folded[0], peak[0]), max(folded[1], peak[1]))
    torch.cuda.reset_peak_memory_stats(device)
    return peak


def backend_settings() -> dict[str, Any]:
    """The process's torch flags that change GPU speed: TF32 in matmuls and in cuDNN convolutions, cuDNN autotuning."""
    return {"float32_matmul_precision": torch.get_float32_matmul_precision(),
            "cudnn_allow_tf32": torch.backends.cudnn.allow_tf32, "cudnn_benchmark": torch.backends.cudnn.benchmark}


def apply_backend_settings(settings: Mapping[str, Any]) -> None:
    """Set the flags that `backend_settings` reads (a benchmark gives both of its sides the same)."""
    torch.set_float32_matmul_precision(settings["float32_matmul_precision"])
    torch.backends.cudnn.allow_tf32 = settings["cudnn_allow_tf32"]
    torch.backends.cudnn.benchmark = settings["cudnn_benchmark"]


def temp_path(path: Path) -> Path:
    """The hidden temporary name a file is written under before its rename: `.NAME.tmp-PID`."""
    return path.with_name(f".{path.name}.tmp-{os.getpid()}")


def _is_disk_full(err: BaseException) -> bool:
    if isinstance(err, OSError):
        return err.errno in (errno.ENOSPC, errno.EDQUOT)
    return "No space left on device" in str(err)  # writers in other languages (safetensors) wrap the OS error


def atomic_write(path: str | os.PathLike, write: Callable[[Path], None], size: int) -> None:
    """`write(tmp)` to a temporary name, then sync and rename, so that a failed write never leaves a partial file.

    About `size` bytes must be free first; a full disk raises DiskFullError. The file gets ordinary permissions
    (0o666 less the umask), whatever the writer chose.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    free = shutil.disk_usage(path.parent).free
    if free < size:
        raise DiskFullError(path, size, free)
    tmp = temp_path(path)
    try:
        with open(tmp, "wb"):
            mode = stat.S_IMODE(os.stat(tmp).st_mode)  # what open() gives under the umask
        write(tmp)
        os.chmod(tmp, mode)
        with open(tmp, "rb") as handle:
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except Exception as err:
        if _is_disk_full(err):
            raise DiskFullError(path, size, shutil.disk_usage(path.parent).free) from None
        if isinstance(err, OSError) and err.filename == str(tmp):  # name the file the user asked for
            raise UserError(f"cannot write {path}: {err.strerror}") from None
        raise
    finally:
        tmp.unlink(missing_ok=True)


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    """`text` (UTF-8) written atomically to `path`."""
    data = text.encode("utf-8")
    atomic_write(path, lambda tmp: tmp.write_bytes(data), len(data))


def ensure_writable_dir(path: str | os.PathLike, flag: str) -> None:
    """Refuse a folder that cannot be created or written, before any work; nothing is created here."""
    path = Path(path).absolute()
    existing = next(p for p in (path, *path.parents) if p.exists())
    if not existing.is_dir():
        raise UserError(f"{flag} {path}: {existing} is a file, not a folder")
    try:
        with tempfile.TemporaryFile(dir=existing):
            pass
    except OSError as err:
        reason = "is on a read-only file system" if err.errno == errno.EROFS else f"is not writable ({err.strerror})"
        raise UserError(f"{flag} {path}: {existing} {reason}; choose another folder") from None


@functools.lru_cache(maxsize=8)
def _sha256(path: str, size: int, mtime_ns: int) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 24), b""):
            digest.update(block)
    return digest.hexdigest()


def file_sha256(path: str) -> str:
    """SHA-256 of a file, computed once per file version in a run; of a folder (a diffusers pipeline), the SHA-256
    of its files' relative paths and SHA-256s, in name order."""
    if os.path.isdir(path):
        digest = hashlib.sha256()
        for file in sorted(p for p in Path(path).rglob("*") if p.is_file()):
            digest.update(f"{file.relative_to(path).as_posix()}\0{file_sha256(str(file))}\n".encode())
        return digest.hexdigest()
    stat = os.stat(path)
    return _sha256(os.path.realpath(path), stat.st_size, stat.st_mtime_ns)


PROJECT_ROOT = Path(__file__).resolve().parent.parent  # a clone's root, or site-packages once installed
PROJECT_FOLDERS = {"configs": "dreambooth_configs", "data": "dreambooth_data"}  # a clone's folder: its installed name


def project_path(relative: str | os.PathLike) -> Path:
    """A file of the project's own (`configs/...` or `data/...`), in the installed package or else in the clone."""
    top, *rest = Path(relative).parts
    installed = PROJECT_ROOT / PROJECT_FOLDERS[top]
    return (installed if installed.is_dir() else PROJECT_ROOT / top).joinpath(*rest)


def user_or_project_path(path: str) -> str:
    """`path` as given when it exists (relative to the working folder); else the project's own file of that name
    (`configs/toy/v1-inference.yaml`, `data/toy/toy-v1.safetensors`) when there is one; else `path` unchanged."""
    if not path or Path(path).exists() or Path(path).is_absolute() or Path(path).parts[0] not in PROJECT_FOLDERS:
        return path
    own = project_path(path)
    return str(own) if own.exists() else path


def import_offline(name: str) -> ModuleType:
    """The module `name`, imported with the hub switched off unless the environment sets HF_HUB_OFFLINE itself."""
    with hub_offline(), _dropped_warning(UNUSED_KERNEL_LOGGER, UNUSED_KERNEL_WARNING):
        return importlib.import_module(name)


@contextmanager
def hub_offline() -> Iterator[None]:
    """No hub access in the block: HF_HUB_OFFLINE=1 for a huggingface_hub imported inside it, and the flag that an
    already imported huggingface_hub reads at call time. A user's own HF_HUB_OFFLINE (0 or 1) is left as it is."""
    if HUB_OFFLINE_ENV in os.environ:
        yield
        return
    constants = sys.modules.get("huggingface_hub.constants")
    before = getattr(constants, HUB_OFFLINE_ENV, None)
    os.environ[HUB_OFFLINE_ENV] = "1"
    if constants is not None:
        setattr(constants, HUB_OFFLINE_ENV, True)
    try:
        yield
    finally:
        del os.environ[HUB_OFFLINE_ENV]
        if constants is not None:
            setattr(constants, HUB_OFFLINE_ENV, before)


@contextmanager
def _dropped_warning(logger_name: str, prefix: str) -> Iterator[None]:
    """The records that the logger `logger_name` logs starting with `prefix` are dropped in the block."""
    def keep(record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith(prefix)

    logger = logging.getLogger(logger_name)
    logger.addFilter(keep)
    try:
        yield
    finally:
        logger.removeFilter(keep)


def mean(values: Sequence[float]) -> Optional[float]:
    """The mean, None for no values."""
    return sum(values) / len(values) if values else None
