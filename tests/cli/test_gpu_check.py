"""sd-gpu-check (scripts/gpu_check.py): a failed stage is one line and exit status 1, an out-of-memory stage "does not
fit"; the StepTimer's per-step CUDA peaks that the lowmem stage reads; SDPA shapes from the config, card peaks by name;
the library's 8-bit self-check is preferred where it exists (the --tiny run of every stage on the CPU:
tests/e2e/test_gpu_check_e2e.py)."""
import json
import subprocess
from types import SimpleNamespace

import pytest
import torch

from ldm.callbacks.timing import StepTimer
from ldm.config import load_config
from tests.helpers.repo import REPO, load_script

gpu_check = load_script("gpu_check")
device_check = gpu_check.device_check  # scripts/benchmarks/device_check.py, as gpu_check imports it
FULL_INFERENCE = str(REPO / "configs" / "stable-diffusion" / "v1-inference.yaml")


def test_a_failed_stage_is_one_line_and_the_others_still_run(tmp_path, capsys, monkeypatch):
    def broken(check):
        raise RuntimeError("kernel exploded\nsecond line")

    def env(check):
        check.env = {"name": "a test device"}
        return {"rows": [("device", "a test device")]}

    monkeypatch.setitem(gpu_check.STAGE_FUNCTIONS, "env", env)
    monkeypatch.setitem(gpu_check.STAGE_FUNCTIONS, "sdpa", broken)
    monkeypatch.setitem(gpu_check.STAGE_FUNCTIONS, "adamw8bit", lambda check: {"rows": [("parity", "1.0")]})
    out = tmp_path / "report.json"
    code = gpu_check.main(["--tiny", "--device", "cpu", "--stages", "adamw8bit,sdpa", "--out", str(out)])
    printed, err = capsys.readouterr()
    assert code == 1
    assert err.strip().splitlines()[-1].startswith("error: stage(s) failed: sdpa;")
    assert "sdpa" in printed and "failed: RuntimeError: kernel exploded" in printed and "second line" not in printed
    assert "adamw8bit  parity" in printed
    stages = json.loads(out.read_text())["stages"]
    assert list(stages) == ["env", "sdpa", "adamw8bit"] and stages["adamw8bit"]["status"] == "ok"


def test_unknown_stages_and_a_cap_without_a_card_are_one_line(capsys):
    assert gpu_check.main(["--stages", "env,warp"]) == 1
    assert capsys.readouterr().err.strip().splitlines() == [
        "error: --stages 'env,warp': expected a comma-separated subset of env,sdpa,adamw8bit,lowmem,fastest,sampling"]
    assert gpu_check.main(["--device", "cpu", "--vram", "6"]) == 1
    assert capsys.readouterr().err.strip().splitlines() == [
        "error: --vram 6.0: caps a CUDA card's memory, so it needs a card and a positive number of GiB"]


def test_out_of_memory_in_a_stage_process_does_not_fit(tmp_path, monkeypatch):
    def oom(command, stdout, **kwargs):
        stdout.write("Traceback (most recent call last):\ntorch.OutOfMemoryError: CUDA out of memory. Tried to "
                     "allocate 2.00 GiB\n")
        return SimpleNamespace(returncode=1)

    monkeypatch.setattr(subprocess, "run", oom)
    opt = gpu_check.parse_args(["--tiny", "--device", "cpu"])
    check = gpu_check.Check(opt, tmp_path)
    with pytest.raises(gpu_check.StageFailed) as caught:
        check.run("lowmem", "train", {})
    assert caught.value.status == "does not fit"


def test_the_attention_shapes_come_from_the_config_and_known_cards_have_peaks():
    shapes = device_check.attention_shapes(load_config(FULL_INFERENCE), 512)
    assert shapes == {"UNet head dim 40": (8, 4096, 40), "UNet head dim 80": (8, 1024, 80),
                      "UNet head dim 160": (8, 256, 160), "VAE 1 head of 512": (1, 4096, 512)}
    assert device_check.peak_tflops("NVIDIA H100 PCIe") == 756 and device_check.peak_tflops("NVIDIA H100 80GB HBM3") == 989
    assert device_check.peak_tflops("NVIDIA A100-SXM4-80GB") == 312 and device_check.peak_tflops("NVIDIA A10") == 125
    assert device_check.peak_tflops("NVIDIA A10G") is None and device_check.peak_tflops("AMD EPYC") is None


def test_the_step_timer_keeps_each_steps_cuda_peaks(tmp_path, monkeypatch):
    allocator = {"allocated": 0, "reserved": 0}
    monkeypatch.setattr(torch.cuda, "synchronize", lambda device=None: None)
    monkeypatch.setattr(torch.cuda, "max_memory_allocated", lambda device=None: allocator["allocated"])
    monkeypatch.setattr(torch.cuda, "max_memory_reserved", lambda device=None: allocator["reserved"])
    monkeypatch.setattr(torch.cuda, "reset_peak_memory_stats", lambda device=None: allocator.update(allocated=0,
                                                                                                   reserved=0))

    class Module(torch.nn.Linear):
        device = torch.device("cuda")

    module, output = Module(2, 2), tmp_path / "timer.json"
    trainer = SimpleNamespace(global_step=0, max_steps=3, is_global_zero=True, precision="bf16-mixed", optimizers=[])
    timer = StepTimer(str(output))
    allocator.update(allocated=9, reserved=10)  # loading and caching, before the first step
    timer.on_train_start(trainer, module)
    for step, (allocated, reserved) in enumerate([(4, 6), (7, 8), (3, 6)], start=1):
        allocator.update(allocated=allocated, reserved=reserved)
        trainer.global_step = step
        timer.on_train_batch_end(trainer, module, None, None, step - 1)
    result = json.loads(output.read_text())
    assert result["cuda_step_peaks"] == [[4, 6], [7, 8], [3, 6]]
    assert (result["cuda_max_allocated_bytes"], result["cuda_max_reserved_bytes"]) == (7, 8)  # since train start
