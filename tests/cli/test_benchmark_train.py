"""scripts/benchmarks/train.py on the tiny config: its table, its one-line errors, the full-size twin on the meta device
and the reference's settings (the runs themselves: tests/e2e/test_benchmark_train_e2e.py)."""
import re

import pytest
import torch
from omegaconf import OmegaConf

from ldm.util import apply_backend_settings, backend_settings, count_params, instantiate_from_config
from tests.helpers.repo import REPO, load_script

pytest.importorskip("diffusers", reason="the benchmark compares against diffusers' UNet and training step")
benchmark = load_script("benchmarks/train")
TINY = str(REPO / "configs" / "tiny" / "v1-finetune_unfrozen.yaml")
NUMBER = r"(\d+\.\d+)"
# name, median s/step (min-max), memory GiB, start-up s, then the ratio to the reference or "-", then the settings
ROW = re.compile(rf"^(\S+(?: bf16| fp16)?)\s+{NUMBER} \({NUMBER}-{NUMBER}\)\s+{NUMBER} GiB\s+{NUMBER} s\s+"
                 rf"(?:{NUMBER}x time, {NUMBER}x memory|-)\s+(.+)$")


def table(out: str) -> dict[str, re.Match]:
    """The rows of the printed table by name (after the title and the header lines)."""
    lines = out.strip().splitlines()
    assert len(lines) >= 3, out
    rows = {m.group(1): m for m in map(ROW.match, lines[2:]) if m}
    assert len(rows) == len(lines) - 2, f"unparsed rows in:\n{out}"
    return rows


def check_row(row: re.Match, compared: bool) -> None:
    median, low, high, memory, startup = (float(row.group(i)) for i in range(2, 7))
    assert 0 < low <= median <= high and memory > 0.05 and startup > 0.1
    assert (row.group(7) is not None) == compared
    if compared:
        assert float(row.group(7)) > 0 and float(row.group(8)) > 0


@pytest.mark.parametrize("args,message", [
    (["--config", "configs/nope.yaml"], "error: config not found: configs/nope.yaml"),
    (["--config", TINY, "--size", "60"], "error: --size 60: must be a positive multiple of 16"),
    (["--config", TINY, "--set", "x"], "error: --set 'x': expected NAME="),
    (["--config", TINY, "--reference_flags", "--xformers", "--reference", "diffusers"],
     "error: --reference_flags: --xformers is not among"),
])
def test_errors_are_one_line(capsys, tmp_path, args, message):
    assert benchmark.main([*args, "--workdir", str(tmp_path)]) == 1
    out, err = capsys.readouterr()
    assert out == "" and err.startswith(message) and err.count("\n") == 1, err


def test_full_size_twin_has_sd_v1_sizes_on_meta():
    config = OmegaConf.load(REPO / "configs" / "stable-diffusion" / "v1-finetune_unfrozen.yaml")
    with torch.device("meta"):
        theirs = benchmark.diffusers_parts(config)
        ours = instantiate_from_config(config.model)
    pairs = {"unet": ours.model.diffusion_model, "vae": ours.first_stage_model,
             "text_encoder": ours.cond_stage_model.transformer.text_model}
    counts = {name: (count_params(theirs[name]), count_params(part)) for name, part in pairs.items()}
    assert counts["unet"] == (859_520_964, 859_520_964)
    assert all(a == b for a, b in counts.values()), counts
    assert list(theirs["unet"].config.block_out_channels) == [320, 640, 1280, 1280]
    assert theirs["unet"].config.cross_attention_dim == 768 and theirs["unet"].config.attention_head_dim == 8


@pytest.mark.parametrize("tokens,expected", [
    ([], "no"), (["--precision", "bf16-mixed"], "bf16"), (["--precision=16-mixed"], "fp16"),
    (["lightning.trainer.precision=bf16-true", "--optimizer", "adamw8bit"], "bf16"), (["--precision", "32"], "no"),
])
def test_reference_precision_follows_the_set(tokens, expected):
    assert benchmark.mixed_precision(tokens) == expected


def test_a_reference_runs_with_the_backend_flags_of_its_set():
    lowmem = {"float32_matmul_precision": "high", "cudnn_allow_tf32": True, "cudnn_benchmark": False}
    fast = {**lowmem, "cudnn_benchmark": True}
    reference_of = {"fast": "diffusers bf16", "lowmem": "diffusers bf16", "fp32": "diffusers"}
    ours = {"fast": {"backend": fast}, "lowmem": {"backend": lowmem}, "fp32": {"backend": lowmem}}
    assert benchmark.reference_backend("diffusers bf16", reference_of, ours) == fast
    assert benchmark.reference_backend("diffusers", reference_of, ours) == lowmem
    assert benchmark.reference_backend("diffusers", reference_of, {}) == benchmark.default_backend()
    before = backend_settings()
    try:
        apply_backend_settings(fast)
        assert backend_settings() == fast  # what a worker applies is what it records
    finally:
        apply_backend_settings(before)
