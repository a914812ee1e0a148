"""Run folders: a new `logs/<timestamp>_<name>` per run, or the one that `-r` resumes (a folder, a file in it, or
`latest`), from its resumable `last.ckpt` or, with `--resume_weights_only`, from its newest `step_<N>.ckpt`."""
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

from ldm.callbacks.checkpointing import STEP_FILE, step_files
from ldm.util import UserError

logger = logging.getLogger(__name__)


@dataclass
class Run:
    """Where a run writes, the saved configs it starts from, and what it resumes: `checkpoint` (last.ckpt, restored
    by Lightning with its optimizer) or `weights` (a weights-only step file, continued at `step`)."""

    logdir: Path
    configs: list[str] = field(default_factory=list)
    checkpoint: Optional[Path] = None
    weights: Optional[Path] = None
    step: int = 0


def new_run(logdir: str, name: str, postfix: str, now: str) -> Run:
    """A run folder that does not exist yet: `<logdir>/<now>_<name><postfix>`, numbered when taken."""
    folder = Path(logdir) / (f"{now}_{name}" if name else now)
    folder = folder.with_name(folder.name + postfix)
    candidate, n = folder, 1
    while candidate.exists():  # two runs started in the same second
        n += 1
        candidate = folder.with_name(f"{folder.name}-{n}")
    return Run(candidate)


def latest_run(logdir: str | Path) -> Path:
    """The newest run folder made by main.py under `logdir` (names start with their timestamp)."""
    root = Path(logdir)
    runs = sorted(p for p in root.iterdir() if (p / "configs").is_dir()) if root.is_dir() else []
    if not runs:
        raise UserError(f"-r latest: no run folder in {root} (pass --logdir where your runs are, or -r logs/<run>)")
    logger.info("-r latest: %s (the newest of %d runs in %s)", runs[-1], len(runs), root)
    return runs[-1]


def resumed_run(target: str, logdir: str, weights_only: bool) -> Run:
    """The run that `-r target` names, checked before any model is loaded."""
    path = latest_run(logdir) if target == "latest" else Path(target)
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
