"""scripts/benchmarks/train.py end to end on the tiny config: main.py against diffusers' DreamBooth step, the UNets
alone, and a failed run that ends with its error."""
import json
import re

import pytest

from tests.cli.test_benchmark_train import TINY, benchmark, check_row, table

pytestmark = pytest.mark.e2e


@pytest.mark.slow  # a benchmark script, 16 s
def test_training_steps_against_diffusers(capsys, tmp_path):
    code = benchmark.main(["--config", TINY, "--size", "64", "--steps", "3", "--set", "fp32=", "--reference",
                           "diffusers", "--threads", "1", "--workdir", str(tmp_path)])
    out, err = capsys.readouterr()
    assert code == 0, err
    assert "64x64, batch 1 instance + 1 class (prior preservation), text encoder frozen, 3 steps" in out
    rows = table(out)
    assert list(rows) == ["fp32", "diffusers"]
    check_row(rows["fp32"], compared=True)
    check_row(rows["diffusers"], compared=False)
    assert "32-true, AdamW" in rows["fp32"].group(9) and "mixed_precision no" in rows["diffusers"].group(9)
    size = float(re.search(r"last\.ckpt (\d+\.\d+) GB", rows["fp32"].group(9)).group(1))
    assert size > 0 and "last.ckpt" not in rows["diffusers"].group(9)
    backend = "TF32 matmul high, cuDNN TF32 on, autotune on"  # main.py's and the tiny config's, copied by diffusers
    assert backend in rows["fp32"].group(9) and backend in rows["diffusers"].group(9)
    assert "[1/2] fp32" in err and "[2/2] diffusers" in err
    ours = json.loads((tmp_path / "measured" / "fp32-0.json").read_text())
    assert len(ours["steps"]) == 3 and ours["torch_threads"] == 1 and ours["trainable_parameters"] > 0
    assert not any((tmp_path / "runs").iterdir()), "the run folder (with its last.ckpt) was left behind"
    assert len(list(tmp_path.glob("random-*.ckpt"))) == 1 and len(list(tmp_path.glob("diffusers-*"))) == 1


@pytest.mark.slow  # a benchmark script, 12 s
def test_unet_only(capsys):
    code = benchmark.main(["--config", TINY, "--size", "64", "--steps", "3", "--unet_only", "--threads", "1"])
    out, err = capsys.readouterr()
    assert code == 0, err
    assert "UNet alone, 64x64 (latents 8x8), batch 2, forward+backward" in out
    rows = table(out)
    assert list(rows) == ["ours", "diffusers"]
    check_row(rows["ours"], compared=True)
    check_row(rows["diffusers"], compared=False)


def test_a_failed_run_ends_with_its_error(capsys, tmp_path):
    args = ["--config", TINY, "--size", "64", "--steps", "2", "--set", "bad=--no_such_flag", "--threads", "1"]
    assert benchmark.main([*args, "--workdir", str(tmp_path)]) == 1
    last = capsys.readouterr().err.strip().splitlines()[-1]
    assert last.startswith("error: set bad: exited with status 2 without timings: ") and "--no_such_flag" in last
