"""scripts/benchmark_sampling.py runs for a sampler diffusers has and for one it lacks (tiny config, one repeat)."""
import pytest

from conftest import TINY_CONFIG, load_script

pytest.importorskip("diffusers", reason="the benchmark compares against diffusers' pipeline")
benchmark = load_script("benchmark_sampling")


@pytest.mark.parametrize("sampler,compared", [("unipc", True), ("dpm_fast", False)])
def test_benchmark_prints_times(capsys, sampler, compared):
    code = benchmark.main(["--config", str(TINY_CONFIG), "--sampler", sampler, "--steps", "3", "--repeats", "1",
                           "--H", "64", "--W", "64", "--device", "cpu"])
    out = capsys.readouterr().out
    assert code == 0
    assert f"{sampler} 3 steps, batch 1" in out and "s/image" in out
    assert ("ratio ours / diffusers" in out) == compared
    assert ("timed ours alone" in out) != compared
