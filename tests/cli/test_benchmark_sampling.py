"""scripts/benchmarks/sampling.py runs for a sampler diffusers has and for one it lacks (tiny config, one repeat),
both sides with the same settings."""

import pytest
import torch

from ldm.inference.loading import weights_dtype
from tests.helpers.repo import TINY_CONFIG, load_script

pytest.importorskip("diffusers", reason="the benchmark compares against diffusers' pipeline")
benchmark = load_script("benchmarks/sampling")


@pytest.mark.parametrize("sampler,compared", [("unipc", True), ("dpm_fast", False)])
def test_benchmark_prints_times(capsys, sampler, compared):
    code = benchmark.main(["--config", str(TINY_CONFIG), "--sampler", sampler, "--steps", "3", "--repeats", "1",
                           "--H", "64", "--W", "64", "--device", "cpu"])
    out = capsys.readouterr().out
    assert code == 0
    assert f"{sampler} 3 steps, batch 1" in out and "s/image" in out
    assert ("ratio ours / diffusers" in out) == compared
    assert ("timed ours alone" in out) != compared
    assert "both sides: weights float32, TF32 matmul high, cuDNN TF32 on, autotune off" in out


def test_both_sides_hold_the_same_weights_dtype():
    gpu = benchmark.side_settings("autocast", torch.device("cuda"))
    assert gpu["dtype"] == torch.float16 and not gpu["cudnn_benchmark"]
    assert benchmark.side_settings("autocast", torch.device("cpu"))["dtype"] == torch.float32
    assert benchmark.side_settings("full", torch.device("cuda"))["dtype"] == torch.float32
    for precision, device in (("autocast", "cuda"), ("autocast", "cpu"), ("full", "cuda"), ("bf16", "cpu")):
        # our model is loaded at weights_dtype (its dtypes are tested in test_precision); the pipeline gets the same
        device = torch.device(device)
        assert benchmark.side_settings(precision, device)["dtype"] == weights_dtype(precision, device)
