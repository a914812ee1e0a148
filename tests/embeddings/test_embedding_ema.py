"""EMA in an embedding run: the average covers the vectors alone in textual inversion and the vectors beside the UNet
or its LoRA in pivotal tuning, follows the decay, is what the embedding files hold (the model keeps its trained
vectors), and last.ckpt keeps it for a resume."""
import pytest
import torch

from ldm.checkpoint import CheckpointError, read_embedding, read_state_dict
from ldm.embeddings.training import AVERAGE, VECTORS
from ldm.lora.layers import is_lora_key
from ldm.modules.ema import named_parameters
from tests.helpers.models import build_tiny_model, randomise_zero_init

BATCH = {"jpg": torch.rand(2, 64, 64, 3) * 2 - 1, "txt": ["a photo of sks dog", "a photo of a dog"]}
RUNS = {"inversion": {}, "pivotal": {"pivotal": True}, "pivotal-lora": {"lora": {"rank": 4}}}


def embedding_model(run: str = "inversion", use_ema: bool = True, step_file=None):
    options = dict(RUNS[run])
    lora = options.pop("lora", None)
    model = randomise_zero_init(build_tiny_model(embedding={"token": "sks", "init_word": "dog", "num_vectors": 2,
                                                            **options}, lora=lora, use_ema=use_ema, ema_decay=0.5,
                                                 ema_warmup=False))
    if lora:
        model.inject_lora(model.unet_params)
    model.add_embedding(step_file)
    model.learning_rate = 1e-2
    return model


def step(model) -> None:
    """One optimizer step through the LightningModule's hook, which updates the EMA after it."""
    optimizer = model.configure_optimizers()
    optimizer = optimizer["optimizer"] if isinstance(optimizer, dict) else optimizer
    model.train()

    def closure():
        optimizer.zero_grad()
        loss = model.shared_step(BATCH)["loss"]
        loss.backward()
        return loss
    model.optimizer_step(0, 0, optimizer, closure)


def shadow(model) -> dict[str, torch.Tensor]:
    return {name: model.model_ema.get_buffer(key).clone() for name, key in model.model_ema.shadow_names.items()}


@pytest.mark.parametrize("run", RUNS)
def test_the_average_covers_exactly_what_trains(run):
    model = embedding_model(run)
    source = dict(named_parameters(model.ema_source()))
    averaged = {id(source[name]) for name in model.model_ema.shadow_names}
    assert averaged == {id(p) for p in model.trainable_parameters()}
    names = set(model.model_ema.shadow_names)
    assert VECTORS in names
    if run == "inversion":
        assert names == {VECTORS}
    elif run == "pivotal":  # the UNet's average keeps the SD files' names
        assert "model_ema.diffusion_modelout2weight" in model.state_dict() and AVERAGE in model.state_dict()
    else:
        assert names == {name for name, _ in model.named_parameters() if is_lora_key(name)} | {VECTORS}
    assert not hasattr(embedding_model(run, use_ema=False), "model_ema")


def test_the_average_updates_with_the_decay():
    model = embedding_model()
    before = shadow(model)[VECTORS]
    step(model)
    trained = getattr(model, VECTORS).detach()
    assert not torch.equal(before, trained)
    torch.testing.assert_close(shadow(model)[VECTORS], 0.5 * before + 0.5 * trained)
    assert int(model.model_ema.num_updates) == -1  # no warm-up: the decay is 0.5 from the first step


@pytest.mark.parametrize("run, step_file, embedding_file", [
    ("inversion", "step_1.safetensors", "step_1.safetensors"),
    ("pivotal", "step_1.ckpt", "step_1.embedding.safetensors"),
    ("pivotal-lora", "step_1.safetensors", "step_1.embedding.safetensors")])
def test_the_embedding_file_holds_the_average_and_the_model_keeps_its_vectors(run, step_file, embedding_file,
                                                                              tmp_path):
    model = embedding_model(run)
    step(model)
    trained, average = getattr(model, VECTORS).detach().clone(), shadow(model)[VECTORS]
    model.save_step_weights(tmp_path / step_file)
    assert torch.equal(read_embedding(tmp_path / embedding_file).vectors, average)
    assert not torch.equal(average, trained) and torch.equal(getattr(model, VECTORS), trained)
    if run == "pivotal":  # the SD v1 step file has neither the vectors nor their average
        state = read_state_dict(tmp_path / step_file)
        assert VECTORS not in state and AVERAGE not in state and "model_ema.diffusion_modelout2weight" in state
    with model.ema_scope():  # samples during training condition on the average
        assert torch.equal(getattr(model, VECTORS), average)
    assert torch.equal(getattr(model, VECTORS), trained)


@pytest.mark.parametrize("use_ema", [True, False])
def test_captions_are_not_cached_while_the_average_of_stopped_vectors_moves(use_ema):
    model = embedding_model("pivotal", use_ema=use_ema)
    getattr(model, VECTORS).requires_grad_(False)  # as at the embedding's stop step
    assert not model.embedding_trains and model.text_conditioning_trains is use_ema


@pytest.mark.parametrize("run", RUNS)
def test_last_ckpt_keeps_the_average_and_a_resume_restores_it(run):
    model = embedding_model(run)
    step(model)
    checkpoint = {"state_dict": model.state_dict()}
    model.on_save_checkpoint(checkpoint)
    state = checkpoint["state_dict"]
    assert VECTORS in state and torch.equal(state[AVERAGE], shadow(model)[VECTORS])
    if run == "inversion":
        assert set(state) == {VECTORS, AVERAGE, "model_ema.decay", "model_ema.num_updates"}
    resumed = embedding_model(run)
    resumed.on_load_checkpoint(checkpoint)
    resumed.load_state_dict(state, strict=False)
    assert all(torch.equal(value, shadow(model)[name]) for name, value in shadow(resumed).items())
    assert torch.equal(getattr(resumed, VECTORS), getattr(model, VECTORS))
    with pytest.raises(CheckpointError, match="has EMA weights .* was it changed"):
        embedding_model(run, use_ema=False).on_load_checkpoint({**checkpoint, "state_dict": dict(state)})
    plain = {"state_dict": embedding_model(run, use_ema=False).state_dict()}
    embedding_model(run, use_ema=False).on_save_checkpoint(plain)
    with pytest.raises(CheckpointError, match="has no EMA weights .* sets model.params.use_ema"):
        embedding_model(run).on_load_checkpoint(plain)


def test_a_pivotal_last_ckpt_from_before_the_vectors_were_averaged_starts_their_average():
    model = embedding_model("pivotal")
    checkpoint = {"state_dict": model.state_dict()}
    model.on_save_checkpoint(checkpoint)
    del checkpoint["state_dict"][AVERAGE]
    model.on_load_checkpoint(checkpoint)
    assert torch.equal(checkpoint["state_dict"][AVERAGE], checkpoint["state_dict"][VECTORS])


@pytest.mark.parametrize("run, step_file", [("inversion", "step_1.safetensors"), ("pivotal", "step_1.ckpt")])
def test_a_resume_from_a_step_file_starts_the_average_from_its_vectors(run, step_file, tmp_path):
    model = embedding_model(run)
    step(model)
    model.save_step_weights(tmp_path / step_file)
    resumed = embedding_model(run, step_file=tmp_path / step_file)
    assert torch.equal(shadow(resumed)[VECTORS], shadow(model)[VECTORS])
    assert torch.equal(getattr(resumed, VECTORS).detach(), shadow(model)[VECTORS])
