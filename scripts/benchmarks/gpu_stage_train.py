"""sd-gpu-check's training stage process (lowmem, fastest): main.py's training in this process, under the
stage's memory cap."""
import json
import sys
from pathlib import Path

BENCHMARKS = Path(__file__).resolve().parent
sys.path[:0] = [str(BENCHMARKS.parents[1]), str(BENCHMARKS.parent)]  # ldm, and benchmarks/

import main  # noqa: E402  (the training CLI, a module beside ldm/, installed as `main`)
from benchmarks.device_check import run_stage  # noqa: E402


def worker_train(spec: dict) -> dict:
    """main.py's training with the StepTimer, in this process under the memory cap; the timer's JSON."""
    code = main.main(spec["argv"])
    if code != 0:
        raise SystemExit(code)
    return json.loads(Path(spec["timer"]).read_text())


WORKERS = {"train": worker_train}

if __name__ == "__main__":
    sys.exit(run_stage(sys.argv[1], WORKERS))
