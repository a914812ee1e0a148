"""DoRA, LoHa and LoKr through the real command lines: main.py --network trains and writes a LyCORIS step file,
stable_txt2img.py --lora samples with it, scripts/merge_lora.py folds it into a checkpoint that samples the same
image; a bad --network or --factor is one error line."""
import json

import numpy as np
import pytest
from PIL import Image

from ldm.checkpoint import read_lora
from ldm.images import read_metadata
from tests.e2e.test_lora_train import base_ckpt, folders, lora_args  # noqa: F401 (module fixtures)
from tests.helpers.repo import TINY_CONFIG, load_script
from tests.helpers.runs import run_main

pytestmark = pytest.mark.e2e

txt2img, merge_script = load_script("stable_txt2img"), load_script("merge_lora")
SAMPLING = ["--config", str(TINY_CONFIG), "--device", "cpu", "--n_iter", "1", "--n_samples", "1", "--ddim_steps", "2",
            "--H", "64", "--W", "64", "--skip_grid", "--seed", "0", "--prompt", "a photo of sks dog"]
LABELS = {"dora": "DoRA", "loha": "LoHa", "lokr": "LoKr"}


def sample(outdir, ckpt, *extra):
    assert txt2img.main([*SAMPLING, "--ckpt", str(ckpt), "--outdir", str(outdir), *extra]) == 0
    return outdir / "samples" / "00000.png"


@pytest.mark.parametrize("network", ["dora", pytest.param("loha", marks=pytest.mark.slow),
                                     pytest.param("lokr", marks=pytest.mark.slow)])  # their parity: unit tests
def test_train_sample_and_merge_each_kind(base_ckpt, folders, tmp_path, capsys, network):  # noqa: F811
    proc = run_main(*lora_args(base_ckpt, folders, tmp_path / "logs", "--rank", "4", "--network", network,
                               "--max_steps", "2", "lightning.modelcheckpoint.params.every_n_train_steps=2"))
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert f"{LABELS[network]} rank 4" in proc.stderr
    (run,) = (tmp_path / "logs").iterdir()
    step = run / "checkpoints" / "step_2.safetensors"
    tensors, metadata = read_lora(step)
    assert metadata["ss_network_module"] == "lycoris.kohya"
    kind_key = {"dora": ".dora_scale", "loha": ".hada_w2_b", "lokr": ".lokr_w1"}[network]
    assert any(key.endswith(kind_key) for key in tensors)
    assert json.loads(metadata["ss_network_args"])["algo"] == ("lora" if network == "dora" else network)
    with_lora = sample(tmp_path / "lora", base_ckpt, "--lora", str(step))
    assert read_metadata(with_lora)["loras"][0]["file"] == "step_2.safetensors"
    merged = tmp_path / "merged.safetensors"
    capsys.readouterr()
    assert merge_script.main([str(base_ckpt), str(step), "-o", str(merged), "--config", str(TINY_CONFIG)]) == 0
    assert f"applied 84 modules (84 UNet, 0 text encoder; 84 {LABELS[network]})" in capsys.readouterr().out
    from_merged = sample(tmp_path / "merged", merged)
    pixels = [np.asarray(Image.open(path), dtype=np.int16) for path in (with_lora, from_merged)]
    assert np.abs(pixels[0] - pixels[1]).max() <= 2


@pytest.mark.parametrize("flags, message", [
    (["--network", "lycoris"], "error: network 'lycoris' (--network): use one of lora, dora, loha, lokr"),
    (["--network", "loha", "--factor", "4"], "error: --factor 4 is LoKr's"),
])
def test_bad_network_flags_are_one_line_errors(base_ckpt, folders, tmp_path, flags, message):  # noqa: F811
    proc = run_main(*lora_args(base_ckpt, folders, tmp_path, "--rank", "4", "--max_steps", "1", *flags))
    assert proc.returncode == 1 and "Traceback" not in proc.stderr
    assert message in proc.stderr
