"""Run folders: a new `logs/<timestamp>_<name>` per run, or the one that `-r` resumes (a folder, a file in it, or
`latest`), from its resumable `last.ckpt` or, with `--resume_weights_only`, from its newest `step_<N>.ckpt`; the lock
that a training process holds on its run folder."""
import contextlib
import logging
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Iterator, Optional

from pytorch_lightning.utilities.rank_zero import rank_zero_only

from ldm.util import UserError

try:
    import fcntl
except ImportError:  # Windows
    fcntl = None
    import msvcrt

logger = logging.getLogger(__name__)

LOCK_FILE = ".lock"
WINDOWS_LOCK_OFFSET = 1 << 20  # msvcrt's locks are mandatory: lock a byte past the pid, so that others can read it
STEP_FILE = re.compile(r"step_(\d+)\.(ckpt|safetensors)")


def step_files(folder: Path) -> list[tuple[int, Path]]:
    """The weights-only step files of a checkpoint folder, oldest first, with their steps: `step_<N>.ckpt`, or a
    LoRA run's `step_<N>.safetensors` (beside a .ckpt, a .safetensors is its shareable copy)."""
    found: dict[int, Path] = {}
    for path in sorted(folder.glob("step_*"), key=lambda p: p.suffix != ".ckpt"):
        match = STEP_FILE.fullmatch(path.name)
        if match:
            found.setdefault(int(match.group(1)), path)
    return sorted(found.items())


@dataclass
class Run:
    """Where a run writes, the saved configs it starts from, and what it resumes: `checkpoint` (last.ckpt, restored
    by Lightning with its optimizer) or `weights` (a weights-only step file, continued at `step`)."""

    logdir: Path
    configs: list[str] = field(default_factory=list)
    checkpoint: Optional[Path] = None
    weights: Optional[Path] = None
    step: int = 0
    created: Optional[Path] = None  # the topmost folder that new_run created: the run folder or a parent of it


def new_run(logdir: str, name: str, postfix: str, now: str) -> Run:
    """A new run folder, created here so that no other run can take it: `<logdir>/<now>_<name><postfix>`, with `-2`,
    `-3`, ... when two runs start in the same second."""
    folder = Path(logdir) / (f"{now}_{name}" if name else now)
    folder = folder.with_name(folder.name + postfix)
    missing = [p for p in folder.absolute().parents if not p.exists()]
    folder.parent.mkdir(parents=True, exist_ok=True)
    candidate, n = folder, 1
    while True:
        try:
            candidate.mkdir()
            return Run(candidate, created=missing[-1] if missing else candidate.absolute())
        except FileExistsError:
            n += 1
            candidate = folder.with_name(f"{folder.name}-{n}")


def latest_run(logdir: str | Path, weights_only: bool = False) -> Path:
    """The run under `logdir` whose `last.ckpt` (with `weights_only`: newest step file) was written last; when no run
    has one, the newest-created run folder (names start with their timestamp)."""
    root = Path(logdir)
    runs = sorted(p for p in root.iterdir() if (p / "configs").is_dir()) if root.is_dir() else []
    if not runs:
        raise UserError(f"-r latest: no run folder in {root} (pass --logdir where your runs are, or -r logs/<run>)")
    written = {run: path.stat().st_mtime for run in runs if (path := _resumable(run, weights_only)) is not None}
    if written:
        chosen = max(written, key=lambda run: (written[run], run.name))
        why = f"its {'step file' if weights_only else 'last.ckpt'} is the newest of {len(runs)} runs in {root}"
    else:
        chosen, why = runs[-1], f"the newest-created of {len(runs)} runs in {root}; none has a checkpoint"
    logger.info("-r latest: %s (%s)", chosen, why)
    return chosen


def _resumable(run: Path, weights_only: bool) -> Optional[Path]:
    """The file that -r would resume `run` from, if it has one."""
    folder = run / "checkpoints"
    if weights_only:
        steps = step_files(folder) if folder.is_dir() else []
        return steps[-1][1] if steps else None
    return folder / "last.ckpt" if (folder / "last.ckpt").is_file() else None


def resumed_run(target: str, logdir: str, weights_only: bool) -> Run:
    """The run that `-r target` names, checked before any model is loaded."""
    path = latest_run(logdir, weights_only) if target == "latest" else Path(target)
    if not path.exists():
        raise UserError(f"-r {path}: not found")
    run_dir, ckpt = (path.parent.parent, path) if path.is_file() else (path, None)
    configs = sorted(str(p) for p in (run_dir / "configs").glob("*.yaml"))
    if not configs:
        raise UserError(f"{run_dir / 'configs'}: no saved configs; is {run_dir} a run folder made by main.py?")
    folder = run_dir / "checkpoints"
    steps = step_files(folder) if folder.is_dir() else []
    if weights_only:
        return _from_weights(Run(run_dir, configs), ckpt, steps, folder)
    if ckpt is not None and STEP_FILE.fullmatch(ckpt.name):
        raise UserError(f"{ckpt} holds weights only, no optimizer state; add --resume_weights_only to continue from "
                        f"its step with a fresh optimizer")
    ckpt = ckpt or folder / "last.ckpt"
    if not ckpt.is_file() and steps:
        raise UserError(f"{folder} has no last.ckpt, only weights-only step files (the newest is {steps[-1][1].name}); "
                        f"add --resume_weights_only to continue from step {steps[-1][0]} with a fresh optimizer "
                        "(the optimizer's moment estimates and the learning-rate schedule's position are lost)")
    if not ckpt.is_file():
        raise UserError(f"{ckpt}: not found, nothing to resume (did the run stop before its first checkpoint?)")
    return Run(run_dir, configs, checkpoint=ckpt)


def _from_weights(run: Run, ckpt: Optional[Path], steps: list[tuple[int, Path]], folder: Path) -> Run:
    if ckpt is not None and not STEP_FILE.fullmatch(ckpt.name):
        raise UserError(f"--resume_weights_only continues from a step_<N>.ckpt file, not {ckpt.name}; pass the run "
                        "folder or one of its step files")
    if ckpt is None and not steps:
        raise UserError(f"{folder}: no step_<N>.ckpt file, nothing to resume (did the run stop before its first "
                        "checkpoint?)")
    run.weights = ckpt or steps[-1][1]
    run.step = int(STEP_FILE.fullmatch(run.weights.name).group(1))
    return run


def warn_fresh_optimizer(run: Run) -> None:
    """Say, once the run is known to go on, what a weights-only resume loses."""
    logger.warning("resuming from the weights of %s at step %d with a fresh optimizer: the optimizer's moment "
                   "estimates and the learning-rate schedule's position are not in that file and start again",
                   run.weights, run.step)


def launched_per_process() -> bool:
    """Whether a launcher (torchrun, SLURM's srun, mpirun) started every process of a multi-process run, each running
    main.py from the start (Lightning's own launcher passes its workers the run folder instead)."""
    sizes = (os.environ.get(name, "") for name in ("WORLD_SIZE", "SLURM_NTASKS", "OMPI_COMM_WORLD_SIZE"))
    return any(size.isdigit() and int(size) > 1 for size in sizes)


def _lock(handle: IO[str]) -> None:
    """Take the OS's exclusive lock on an open file without waiting (OSError when another process holds it)."""
    if fcntl is not None:
        fcntl.flock(handle.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
    else:
        handle.seek(WINDOWS_LOCK_OFFSET)
        msvcrt.locking(handle.fileno(), msvcrt.LK_NBLCK, 1)


@contextlib.contextmanager
def run_lock(folder: Path, created: Optional[Path] = None) -> Iterator[None]:
    """Hold `<folder>/.lock` (the pid inside, locked by the OS: fcntl, or msvcrt on Windows) while the block trains,
    so that a second process on the same run stops with one line; a lock left by a process that died is free again
    and taken over. When the folder holds nothing else at the end (a new run that failed early), the folders up to
    `created` (what new_run made) are removed."""
    path = folder / LOCK_FILE
    folder.mkdir(parents=True, exist_ok=True)
    handle = open(path, "a+")
    try:
        _lock(handle)
    except OSError:
        handle.seek(0)
        owner = handle.read().strip() or "unknown"
        handle.close()
        raise UserError(f"{folder} is being trained by another process (pid {owner}); wait for it to end, or stop "
                        "it, before resuming this run") from None
    try:
        handle.seek(0)
        previous = handle.read().strip()
        if previous and previous != str(os.getpid()):
            logger.info("%s: took over the lock of pid %s, which is no longer running", folder, previous)
        handle.seek(0)
        handle.truncate()
        handle.write(f"{os.getpid()}\n")
        handle.flush()
        yield
    finally:
        handle.close()  # closing the file releases the lock
        if created is not None and [p.name for p in folder.iterdir()] == [LOCK_FILE]:
            path.unlink()
            for empty in (folder.absolute(), *folder.absolute().parents):
                with contextlib.suppress(OSError):  # another run may have written beside it since
                    empty.rmdir()
                if empty == created:
                    break


def takes_run_lock() -> bool:
    """Whether this process takes the run folder's lock: the first process of a run (rank zero on node zero), not
    the other processes of a DDP run, which re-run main.py in the same folder."""
    return rank_zero_only.rank == 0 and os.environ.get("NODE_RANK", "0") in ("", "0")
