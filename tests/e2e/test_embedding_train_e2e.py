"""Textual inversion and pivotal tuning through the real command line on the tiny model: the step files are A1111
embedding files (beside the LoRA files in a pivotal run), last.ckpt holds what trains and resumes (with use_ema, the
average too, which the embedding files hold), and the sampling script binds the trained vectors with --embedding (and
the LoRA with --lora)."""
import shutil

import pytest
import torch

from ldm.checkpoint import read_embedding, read_lora, save_weights
from ldm.embeddings.training import AVERAGE, VECTORS
from ldm.images import read_metadata
from tests.helpers.models import build_tiny_model, randomise_zero_init
from tests.helpers.repo import TINY_CONFIG, load_script
from tests.helpers.runs import TINY, make_class_images, make_photos, run_main

pytestmark = pytest.mark.e2e

QUIET = ["lightning.callbacks.image_logger.params.batch_frequency=100"]
TOKEN_TABLE = "cond_stage_model.transformer.text_model.embeddings.token_embedding.weight"
txt2img = load_script("stable_txt2img")


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("embedding")
    base = root / "base.ckpt"
    save_weights(randomise_zero_init(build_tiny_model()).state_dict(), base)
    return base, make_photos(root / "instance"), make_class_images(root / "class", 2)


def train(setup, logdir, config: str, *extra: str):
    base, instance, reg = setup
    proc = run_main("--base", config, "-t", "--actual_resume", str(base), "-n", "ti", "--accelerator", "cpu",
                    "--data_root", str(instance), "--reg_data_root", str(reg), "--class_word", "dog", "-l",
                    str(logdir), "--train_embedding", "--max_steps", "4",
                    "lightning.modelcheckpoint.params.every_n_train_steps=2", *QUIET, *extra)
    assert proc.returncode == 0, proc.stderr[-3000:]
    (run,) = logdir.iterdir()
    return run, proc


@pytest.fixture(scope="module")
def ti_run(setup, tmp_path_factory):
    return train(setup, tmp_path_factory.mktemp("ti-run"), TINY, "--num_vectors", "2")


@pytest.fixture(scope="module")
def pivotal_run(setup, tmp_path_factory):
    return train(setup, tmp_path_factory.mktemp("pivotal-run"), "configs/tiny/v1-finetune_lora.yaml", "--rank", "4",
                 "--embedding_lr", "0.01", "--embedding_stop_step", "0.5")


def sample(tmp_path, capsys, ckpt, *extra: str) -> dict:
    code = txt2img.main(["--config", str(TINY_CONFIG), "--device", "cpu", "--n_iter", "1", "--n_samples", "1",
                         "--ddim_steps", "2", "--H", "64", "--W", "64", "--ckpt", str(ckpt), "--outdir",
                         str(tmp_path), "--prompt", "a photo of sks dog", *extra])
    assert code == 0, capsys.readouterr().err
    return read_metadata(tmp_path / "samples" / "00000.png")


def test_textual_inversion_writes_embedding_files_and_a_last_ckpt_of_the_vectors(ti_run, setup, tmp_path, capsys):
    run, proc = ti_run
    folder = run / "checkpoints"
    assert sorted(p.name for p in folder.iterdir()) == [
        "last.ckpt", "last.safetensors", "step_2.safetensors", "step_4.safetensors"]
    found = read_embedding(folder / "step_4.safetensors")
    assert found.vectors.shape == (2, 32) and found.vectors.dtype == torch.float32
    last = torch.load(folder / "last.ckpt", map_location="cpu", weights_only=True)
    assert set(last["state_dict"]) == {VECTORS} and last["embedding"]["token"] == "sks"
    assert last["embedding"]["init_word"] == "dog" and last["optimizer_states"]
    dog = torch.load(setup[0], weights_only=True)["state_dict"][TOKEN_TABLE][1929]  # the init word's embedding
    assert not torch.equal(read_embedding(folder / "step_2.safetensors").vectors, found.vectors)  # it trains
    assert not torch.equal(found.vectors[0], dog)
    assert "embedding learning rate 5.00e-03" in proc.stdout + proc.stderr
    metadata = sample(tmp_path, capsys, setup[0], "--embedding", f"{folder / 'last.safetensors'}:sks")
    assert metadata["embeddings"] == [{"file": "last.safetensors", "sha256": metadata["embeddings"][0]["sha256"],
                                       "word": "sks", "vectors": 2}]


def test_textual_inversion_resumes_from_last_ckpt(ti_run, tmp_path):
    run = shutil.copytree(ti_run[0], tmp_path / ti_run[0].name)
    before = torch.load(run / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
    proc = run_main("-r", str(run), "--max_steps", "6")
    assert proc.returncode == 0, proc.stderr[-3000:]
    after = torch.load(run / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
    assert after["global_step"] == 6 and set(after["state_dict"]) == {VECTORS}
    assert not torch.equal(before["state_dict"][VECTORS], after["state_dict"][VECTORS])


def test_textual_inversion_with_ema_writes_the_average_in_the_embedding_files_and_last_ckpt(setup, tmp_path):
    run, _ = train(setup, tmp_path, TINY, "model.params.use_ema=true", "model.params.ema_decay=0.5")
    folder = run / "checkpoints"
    state = torch.load(folder / "last.ckpt", map_location="cpu", weights_only=True)["state_dict"]
    assert set(state) == {VECTORS, AVERAGE, "model_ema.decay", "model_ema.num_updates"}
    assert int(state["model_ema.num_updates"]) == 4 and not torch.equal(state[AVERAGE], state[VECTORS])
    for name in ("step_4.safetensors", "last.safetensors"):
        assert torch.equal(read_embedding(folder / name).vectors, state[AVERAGE])


def test_pivotal_tuning_writes_lora_and_embedding_side_by_side_and_samples_with_both(pivotal_run, setup, tmp_path,
                                                                                      capsys):
    run, proc = pivotal_run
    folder = run / "checkpoints"
    assert sorted(p.name for p in folder.iterdir()) == [
        "last.ckpt", "last.embedding.safetensors", "last.safetensors", "step_2.embedding.safetensors",
        "step_2.safetensors", "step_4.embedding.safetensors", "step_4.safetensors"]
    assert read_lora(folder / "step_4.safetensors")[0]
    # the vectors stop at step 2 (0.5 of 4 steps): steps 3 and 4 leave them as they were
    assert torch.equal(read_embedding(folder / "step_2.embedding.safetensors").vectors,
                       read_embedding(folder / "step_4.embedding.safetensors").vectors)
    last = torch.load(folder / "last.ckpt", map_location="cpu", weights_only=True)
    assert VECTORS in last["state_dict"] and any(".lora_A." in k for k in last["state_dict"])
    assert last["embedding"]["stopped_at"] == 2 and last["embedding"]["stop_step"] == 2
    assert "the embedding vectors are frozen from step 2" in proc.stderr
    metadata = sample(tmp_path, capsys, setup[0], "--lora", str(folder / "last.safetensors"), "--embedding",
                      f"{folder / 'last.embedding.safetensors'}:sks")
    assert metadata["loras"][0]["file"] == "last.safetensors" and metadata["embeddings"][0]["word"] == "sks"


def test_embedding_options_without_train_embedding_are_one_line_errors(setup, tmp_path):
    base, instance, _ = setup
    proc = run_main("--base", TINY, "-t", "--actual_resume", str(base), "--accelerator", "cpu", "--data_root",
                    str(instance), "-l", str(tmp_path), "--embedding_lr", "0.01", "--max_steps", "1")
    assert proc.returncode == 1 and "Traceback" not in proc.stderr
    assert "--embedding_lr: options of the trained embedding; add --train_embedding" in proc.stderr
