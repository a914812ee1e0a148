"""Cached latents end to end: main.py --cache_latents trains on the cache, and a resumed run reuses it."""
import pytest
import torch
from safetensors.torch import load_file

from tests.helpers.runs import fresh_run_args, make_class_images, make_photos, run_main

pytestmark = pytest.mark.e2e


def test_cli_trains_on_cached_latents_and_a_resumed_run_reuses_them(tmp_path, tiny_ckpt):
    photos, reg = make_photos(tmp_path / "instance"), make_class_images(tmp_path / "class", 2)
    proc = run_main(*fresh_run_args(tiny_ckpt, photos, reg, tmp_path / "logs", "--cache_latents",
                                    "--freeze_text_encoder", "--max_steps", "2"))
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    (run,) = (tmp_path / "logs").iterdir()
    assert load_file(run / "cache" / "latents_train.safetensors")["moments"].shape == (4, 2, 8, 8, 8)
    assert load_file(run / "cache" / "latents_reg.safetensors")["moments"].shape == (2, 2, 8, 8, 8)
    assert proc.stderr.count("no latent cache yet") == 2 and "encoding the train images" in proc.stderr
    assert (run / "checkpoints" / "last.ckpt").is_file() and list((run / "images" / "train").glob("inputs_*.png"))

    resumed = run_main("-r", str(run), "--max_steps", "3", "lightning.callbacks.image_logger.params.disabled=true")
    assert resumed.returncode == 0, resumed.stderr[-4000:]
    assert resumed.stderr.count("reusing the latent cache") == 2 and "encoding" not in resumed.stderr
    assert torch.load(run / "checkpoints" / "last.ckpt", map_location="cpu")["global_step"] == 3
