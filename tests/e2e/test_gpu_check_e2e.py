"""sd-gpu-check (scripts/gpu_check.py) end to end: the --tiny run on the CPU runs every stage and reports numbers in its
table and JSON."""
import json

import pytest
import torch

from tests.cli.test_gpu_check import gpu_check

pytestmark = pytest.mark.e2e


def test_tiny_runs_every_stage_and_reports_numbers(tmp_path, capsys):
    out = tmp_path / "report.json"
    code = gpu_check.main(["--tiny", "--device", "cpu", "--out", str(out), "--workdir", str(tmp_path / "work")])
    printed, err = capsys.readouterr()
    assert code == 0, printed + err
    report = json.loads(out.read_text())
    stages = report["stages"]
    assert list(stages) == list(gpu_check.STAGES) and all(s["status"] == "ok" for s in stages.values()), stages
    assert stages["env"]["torch"] == torch.__version__ and stages["env"]["device"] == "cpu"
    assert all(kernels["math"] for kernels in stages["sdpa"]["kernels"].values())
    assert sorted(stages["sdpa"]["kernels"]) == ["UNet head dim 16", "UNet head dim 32", "VAE 1 head of 64"]
    eight = stages["adamw8bit"]
    assert eight["compiled"] and eight["max_difference"] < 0.05 * eight["max_update"]
    assert abs(eight["rounding_bias"]) < 0.02 and eight["host_syncs_per_step"] is None  # syncs: counted on CUDA only
    lowmem, fastest, sampling = stages["lowmem"], stages["fastest"], stages["sampling"]
    assert lowmem["s_per_step"] > 0 and lowmem["peak_rss_gib"] > 0 and lowmem["startup_s"] > 0
    assert lowmem["sample_grids"] == 2 and isinstance(lowmem["image_logging_s"], float)  # instance and class
    assert len(lowmem["steps"]) == gpu_check.TINY.lowmem_steps and lowmem["optimizer"].startswith("adamw8bit_torch")
    assert len(list((tmp_path / "work").glob("random-*.ckpt"))) == 1  # one random checkpoint for every stage
    assert fastest["flops_per_step"] > 1e9 and fastest["mfu"] is None  # a CPU is not in the table of peaks
    assert fastest["steps_800_s"] == pytest.approx(800 * fastest["s_per_step"])
    assert sampling["plain_s"] > 0 and sampling["controlnet_s"] > 0
    assert report["verdicts"]["start with"] == "v1-finetune_unfrozen --precision 32"
    lines = printed.splitlines()
    assert lines[0].startswith("sd-gpu-check: ") and "configs/tiny at 64 px" in lines[0]
    for stage in gpu_check.STAGES:
        assert any(line.startswith(stage + " ") for line in lines), stage
    assert any(line.startswith("verdict") and "fits" in line for line in lines)
    assert not any((tmp_path / "work" / "runs").iterdir()), "a run folder was left behind"
