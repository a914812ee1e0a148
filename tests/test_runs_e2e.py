"""End to end, in subprocesses on the tiny config: a SIGTERM while a slow callback runs is saved at the step it
claims, and resumes from there."""
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import torch

from test_train_e2e import ENV, REPO, fresh_run_args, make_class_images, make_photos, metrics

SLOW_ENV = {**ENV, "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO / "tests"), ENV.get("PYTHONPATH")]))}


def slow_at(step: int, marker: Path) -> list[str]:
    """Overrides that add tests/slow_callback.py's SlowStep after the checkpoint callback, slow at `step`."""
    return ["lightning.callbacks.slow.target=slow_callback.SlowStep", f"lightning.callbacks.slow.params.step={step}",
            f"lightning.callbacks.slow.params.marker={marker}", "lightning.callbacks.image_logger.params.disabled=true"]


def test_sigterm_during_a_slow_callback_saves_that_step_and_says_so(tmp_path, tiny_ckpt):
    photos, reg = make_photos(tmp_path / "photos"), make_class_images(tmp_path / "class", 2)
    marker = tmp_path / "slow-step-started"
    args = fresh_run_args(tiny_ckpt, photos, reg, tmp_path / "logs", "--max_steps", "100", *slow_at(3, marker))
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
