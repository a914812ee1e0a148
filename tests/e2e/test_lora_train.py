"""LoRA DreamBooth through the real command line: only the LoRA weights train, step files are kohya LoRA files,
last.ckpt holds the LoRA with the optimizer and resumes (also from a step file), and LoRA flags are checked."""
import hashlib
import json
import shutil

import pytest
import torch
from omegaconf import OmegaConf

from ldm.checkpoint import CheckpointError, load_model_weights, read_lora, read_state_dict, save_weights
from ldm.lora.layers import base_state_dict
from ldm.util import instantiate_from_config
from tests.helpers.models import build_tiny_model, randomise_zero_init
from tests.helpers.repo import REPO
from tests.helpers.runs import make_class_images, make_photos, run_main

pytestmark = pytest.mark.e2e

LORA = "configs/tiny/v1-finetune_lora.yaml"
QUIET = ["lightning.callbacks.image_logger.params.batch_frequency=100"]


def lora_args(ckpt, folders, logdir, *extra: str) -> list[str]:
    instance, reg = folders
    return ["--base", LORA, "-t", "--actual_resume", str(ckpt), "-n", "lora", "--accelerator", "cpu",
            "--data_root", str(instance), "--reg_data_root", str(reg), "--class_word", "dog", "-l", str(logdir),
            *QUIET, *extra]


@pytest.fixture(scope="module")
def base_ckpt(tmp_path_factory):
    """A tiny base whose zero-initialised layers are random, so that every LoRA module gets a gradient."""
    path = tmp_path_factory.mktemp("lora-base") / "base.ckpt"
    save_weights(randomise_zero_init(build_tiny_model()).state_dict(), path)
    return path


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("lora-data")
    return make_photos(root / "instance"), make_class_images(root / "class", 2)


@pytest.fixture(scope="module")
def lora_run(tmp_path_factory, base_ckpt, folders):
    """Four steps of rank-4 LoRA on the UNet and the text encoder, step files every 2."""
    logdir = tmp_path_factory.mktemp("lora-run")
    proc = run_main(*lora_args(base_ckpt, folders, logdir, "--rank", "4", "--lora_text_encoder", "--max_steps", "4",
                               "lightning.modelcheckpoint.params.every_n_train_steps=2"))
    assert proc.returncode == 0, proc.stderr[-3000:]
    (run,) = logdir.iterdir()
    return run, proc


def test_step_files_are_kohya_lora_files_and_last_ckpt_holds_the_lora_only(lora_run, base_ckpt):
    run, _ = lora_run
    folder = run / "checkpoints"
    assert sorted(p.name for p in folder.iterdir()) == [
        "last.ckpt", "last.safetensors", "step_2.safetensors", "step_4.safetensors"]
    tensors, metadata = read_lora(folder / "step_4.safetensors")
    assert any(k.startswith("lora_unet_down_blocks_") for k in tensors)
    assert any(k.startswith("lora_te_text_model_encoder_layers_0_") for k in tensors)
    assert {v.shape[0] for k, v in tensors.items() if k.endswith("lora_down.weight")} == {4}
    assert metadata["ss_network_dim"] == "4" and metadata["ss_network_module"] == "networks.lora"
    assert metadata["ss_steps"] == "4" and metadata["ss_sd_model_name"] == base_ckpt.name
    assert metadata["ss_new_sd_model_hash"] == hashlib.sha256(base_ckpt.read_bytes()).hexdigest()
    last = torch.load(folder / "last.ckpt", map_location="cpu", weights_only=True)
    assert last["global_step"] == 4 and last["optimizer_states"]
    assert last["state_dict"] and all(".lora_A." in k or ".lora_B." in k for k in last["state_dict"])
    assert last["lora"]["rank"] == 4 and last["lora"]["base_checkpoint"] == str(base_ckpt)
    trained = [v for k, v in tensors.items() if k.endswith("lora_up.weight")]
    assert any(v.abs().sum() > 0 for v in trained)  # up starts at zero: it moved
    assert torch.equal(read_lora(folder / "last.safetensors")[0][next(iter(tensors))], tensors[next(iter(tensors))])


def test_summary_names_the_lora_files_and_counts_the_lora_parameters(lora_run):
    run, proc = lora_run
    summary = json.loads((run / "summary.json").read_text())
    tensors, _ = read_lora(run / "checkpoints" / "last.safetensors")
    lora_numel = sum(v.numel() for k, v in tensors.items() if not k.endswith(".alpha"))
    assert summary["steps"] == 4 and summary["trainable_parameters"] == lora_numel
    assert summary["seconds_per_step"] > 0 and summary["peak_memory_bytes"] > 0
    assert "--lora " in proc.stderr and "step_2.safetensors" in proc.stderr


def test_only_the_lora_weights_train(base_ckpt):
    """A few optimizer steps on an injected model leave every base weight bit-identical."""
    config = OmegaConf.load(REPO / LORA)
    config.model.params.lora.text_encoder = True
    config.model.params.cond_stage_trainable = True
    model = instantiate_from_config(config.model)
    base = read_state_dict(base_ckpt)
    model.load_state_dict(base, strict=False)
    model.inject_lora(model.unet_params)
    optimizer = torch.optim.AdamW(model.trainable_parameters(), lr=1e-2)
    batch = {"image": torch.rand(2, 64, 64, 3) * 2 - 1, "caption": ["a sks dog", "a dog"]}
    for _ in range(3):
        optimizer.zero_grad()
        model.shared_step(batch)["loss"].backward()
        optimizer.step()
    after = base_state_dict(model)
    changed = [k for k in base if k in after and not torch.equal(base[k], after[k])]
    assert not changed
    assert all(".lora_" in name for name, p in model.named_parameters() if p.requires_grad)
    assert any(p.abs().sum() > 0 for name, p in model.named_parameters() if "lora_B" in name)


def test_resume_from_last_ckpt_and_from_a_step_file(lora_run, tmp_path):
    run = shutil.copytree(lora_run[0], tmp_path / lora_run[0].name)
    before = torch.load(run / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
    resumed = run_main("-r", str(run), "--max_steps", "6")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "Traceback" not in resumed.stderr
    after = torch.load(run / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
    assert after["global_step"] == 6 and set(after["state_dict"]) == set(before["state_dict"])
    assert any(not torch.equal(before["state_dict"][k], after["state_dict"][k]) for k in before["state_dict"])
    (run / "checkpoints" / "last.ckpt").unlink()
    weights_only = run_main("-r", str(run), "--resume_weights_only", "--max_steps", "7")
    assert weights_only.returncode == 0, weights_only.stderr[-3000:]
    assert "step_6.safetensors at step 6" in weights_only.stderr  # the newest step file (last.ckpt removed)


def test_a_lost_base_checkpoint_is_a_clear_error_on_resume(lora_run, base_ckpt, tmp_path):
    run = shutil.copytree(lora_run[0], tmp_path / lora_run[0].name)
    for config in (run / "configs").glob("*-project.yaml"):
        config.write_text(config.read_text().replace(str(base_ckpt), str(tmp_path / "moved.ckpt")))
    proc = run_main("-r", str(run), "--max_steps", "6")
    assert proc.returncode == 1 and "Traceback" not in proc.stderr
    assert "base checkpoint of this LoRA run" in proc.stderr


@pytest.mark.parametrize("flags, message", [
    (["--lora_alpha", "4"], "--lora_alpha: LoRA options; add --rank N"),
    (["--rank", "0"], "LoRA rank 0 (--rank): expected a positive integer"),
])
def test_bad_lora_flags_are_one_line_errors(base_ckpt, folders, tmp_path, flags, message):
    args = lora_args(base_ckpt, folders, tmp_path, "--max_steps", "1", *flags)
    if flags[0] == "--lora_alpha":
        args[1] = "configs/tiny/v1-finetune_unfrozen.yaml"
    proc = run_main(*args)
    assert proc.returncode == 1 and "Traceback" not in proc.stderr
    assert message in proc.stderr


def test_a_lora_file_given_as_the_model_says_what_to_pass(lora_run):
    folder = lora_run[0] / "checkpoints"
    for name in ("last.ckpt", "last.safetensors"):
        with pytest.raises(CheckpointError, match="is a LoRA file .* pass the base model as the checkpoint and this "
                                                  "file with --lora"):
            load_model_weights(build_tiny_model(), folder / name)
