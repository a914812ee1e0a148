"""One peak-memory helper (ldm.util): allocated and reserved bytes on a GPU, the peak RSS everywhere, and the GPU's
counters restarted when training starts, so that class images and caching do not count (issue 33, item 16). CUDA is
a stand-in here: no GPU is lent to the project."""
import json
from types import SimpleNamespace

import torch

from ldm.callbacks import StepProgress, StepTimer
from ldm.util import peak_memory_stats, peak_memory_text, reset_peak_memory

GPU = torch.device("cuda", 0)


def fake_cuda(monkeypatch) -> dict:
    """torch.cuda's peak counters as a dict: 5 GiB allocated and 6 GiB reserved until reset."""
    counters = {"allocated": 5 << 30, "reserved": 6 << 30, "resets": 0}

    def reset(device):
        counters.update(allocated=1 << 30, reserved=2 << 30, resets=counters["resets"] + 1)
    monkeypatch.setattr(torch.cuda, "max_memory_allocated", lambda device: counters["allocated"])
    monkeypatch.setattr(torch.cuda, "max_memory_reserved", lambda device: counters["reserved"])
    monkeypatch.setattr(torch.cuda, "reset_peak_memory_stats", reset)
    return counters


def test_allocated_and_reserved_on_a_gpu_the_peak_rss_on_the_cpu(monkeypatch):
    fake_cuda(monkeypatch)
    stats = peak_memory_stats(GPU)
    assert stats["cuda_max_allocated_bytes"] == 5 << 30 and stats["cuda_max_reserved_bytes"] == 6 << 30
    assert peak_memory_text(GPU) == "allocated 5.4 GB, reserved 6.4 GB (CUDA)"
    cpu = peak_memory_stats(torch.device("cpu"))
    assert cpu["peak_rss_bytes"] > 0 and cpu["cuda_max_allocated_bytes"] is None
    assert peak_memory_text(torch.device("cpu")).endswith("(process peak RSS)")
    reset_peak_memory(torch.device("cpu"))  # nothing to reset, no CUDA call


def test_training_start_resets_the_peak_and_the_summary_has_both(monkeypatch, tmp_path):
    counters = fake_cuda(monkeypatch)
    trainer = SimpleNamespace(global_step=0, max_steps=2, is_global_zero=False, default_root_dir=str(tmp_path),
                              precision="bf16-true", optimizers=[])
    module = SimpleNamespace(device=GPU, parameters=lambda: iter(()), trainable_parameters=lambda: iter(()))
    progress = StepProgress()
    progress.on_train_start(trainer, module)
    assert counters["resets"] == 1
    trainer.global_step = 2
    progress.write_summary(trainer, module)
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["peak_memory_bytes"] == 1 << 30 and summary["peak_reserved_bytes"] == 2 << 30
    assert summary["peak_memory"] == "allocated 1.1 GB, reserved 2.1 GB (CUDA)"


def test_the_step_timer_reports_the_same_fields(monkeypatch, tmp_path):
    fake_cuda(monkeypatch)
    monkeypatch.setattr(torch.cuda, "synchronize", lambda device: None)
    timer = StepTimer(str(tmp_path / "times.json"))
    trainer = SimpleNamespace(is_global_zero=True, precision="32-true", optimizers=[])
    module = SimpleNamespace(device=GPU, modules=lambda: iter(()), parameters=lambda: iter(()))
    timer.write(trainer, module)
    result = json.loads((tmp_path / "times.json").read_text())
    assert result["cuda_max_allocated_bytes"] == 5 << 30 and result["cuda_max_reserved_bytes"] == 6 << 30
