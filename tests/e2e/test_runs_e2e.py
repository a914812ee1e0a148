"""End to end, in subprocesses on the tiny config: a SIGTERM while a slow callback runs is saved at the step it claims,
and resumes from there; --threads; main.py refuses to resume a run that another process trains."""
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from ldm.training.runs import run_lock
from ldm.util import UserError
from tests.helpers.repo import REPO, load_script
from tests.helpers.runs import ENV, fresh_run_args, make_class_images, make_photos, metrics
from tests.training.test_runs import make_run

pytestmark = pytest.mark.e2e

SLOW_ENV = {**ENV, "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), ENV.get("PYTHONPATH")]))}


def slow_at(step: int, marker: Path) -> list[str]:
    """Overrides that add tests/helpers/slow_callback.py's SlowStep after the checkpoint callback, slow at `step`."""
    return ["lightning.callbacks.slow.target=tests.helpers.slow_callback.SlowStep",
            f"lightning.callbacks.slow.params.step={step}",
            f"lightning.callbacks.slow.params.marker={marker}", "lightning.callbacks.image_logger.params.disabled=true"]


def test_sigterm_during_a_slow_callback_saves_that_step_and_says_so(tmp_path, tiny_ckpt):
    photos, reg = make_photos(tmp_path / "photos"), make_class_images(tmp_path / "class", 2)
    marker = tmp_path / "slow-step-started"
    args = fresh_run_args(tiny_ckpt, photos, reg, tmp_path / "logs", "--max_steps", "100", "--threads", "1",
                          *slow_at(3, marker))
    proc = subprocess.Popen([sys.executable, "main.py", *args], cwd=REPO, env=SLOW_ENV, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 180
        while not marker.exists():
            assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()[1][-3000:]
            time.sleep(0.1)
        proc.send_signal(signal.SIGTERM)
        stdout, stderr = proc.communicate(timeout=120)
    finally:
        proc.kill()
    assert proc.returncode == 143, stderr[-3000:]
    assert "training steps 0 to 100 on cpu (1 device(s), 1 CPU thread(s), precision 32-true)" in stderr
    (run,) = (tmp_path / "logs").iterdir()
    last = run / "checkpoints" / "last.ckpt"
    assert torch.load(last, map_location="cpu")["global_step"] == 3  # step 2's last.ckpt was replaced
    assert f"stopped by SIGTERM at step 3; saved {last}. Resume with: python main.py -t -r {run}" in stdout

    resumed = subprocess.run([sys.executable, "main.py", "-r", str(run), "--max_steps", "5"], cwd=REPO, env=SLOW_ENV,
                             capture_output=True, text=True, timeout=300)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert torch.load(last, map_location="cpu")["global_step"] == 5
    assert "summary: steps 3 to 5 (2 in this session)" in resumed.stderr
    assert [int(row["step"]) for row in metrics(run) if row.get("train/loss")] == [0, 1, 2, 3, 4]


def test_threads_sets_torch_and_the_workers_threads(monkeypatch):
    main = load_script("dreambooth_main_threads", REPO / "main.py")
    monkeypatch.setenv("OMP_NUM_THREADS", "7")
    before = torch.get_num_threads()
    try:
        main.set_threads(1)
        assert torch.get_num_threads() == 1 and os.environ["OMP_NUM_THREADS"] == "1"
    finally:
        torch.set_num_threads(before)
    with pytest.raises(UserError, match="--threads 0: expected 1 or more CPU threads"):
        main.set_threads(0)


def test_main_refuses_to_resume_a_run_that_another_process_trains(tmp_path):
    run = make_run(tmp_path, "2026-12-07T00-00-00_job", {"last.ckpt": 1000})
    shutil.copy(REPO / "configs" / "tiny" / "v1-finetune_unfrozen.yaml", run / "configs" / "project.yaml")
    with run_lock(run):
        proc = subprocess.run([sys.executable, "main.py", "-r", str(run)], cwd=REPO, capture_output=True, text=True,
                              env={**os.environ, "OMP_NUM_THREADS": "1"}, timeout=300)
    assert proc.returncode == 1 and "Traceback" not in proc.stderr
    assert proc.stderr.strip().splitlines()[-1] == (
        f"error: {run} is being trained by another process (pid {os.getpid()}); wait for it to end, or stop it, "
        "before resuming this run")
