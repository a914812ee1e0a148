"""Textual inversion on the tiny model: only the new vectors train (every other weight bit-identical after optimizer
steps), they start from the init word's token embeddings, a prompt's identifier gives way to them, pivotal tuning
trains the UNet beside them at their own learning rate, and the options refuse what cannot work."""
import pytest
import torch

from ldm.embeddings.training import VECTORS, EmbeddingOptions, spread
from ldm.util import UserError
from tests.helpers.models import build_tiny_model, randomise_zero_init

BATCH = {"jpg": torch.rand(2, 64, 64, 3) * 2 - 1, "txt": ["a photo of sks dog", "a photo of a dog"]}


def tiny(embedding: dict, **overrides):
    model = randomise_zero_init(build_tiny_model(embedding=embedding, **overrides))
    model.add_embedding()
    model.learning_rate = 1e-3
    return model


def train(model, steps: int = 3) -> None:
    optimizer = model.configure_optimizers()
    optimizer = optimizer["optimizer"] if isinstance(optimizer, dict) else optimizer
    model.train()
    for _ in range(steps):
        optimizer.zero_grad()
        model.shared_step(BATCH)["loss"].backward()
        optimizer.step()


def test_only_the_vectors_train_and_every_other_weight_stays_bit_identical():
    model = tiny({"token": "sks", "init_word": "dog", "num_vectors": 2, "lr": 1e-2})
    before = {k: v.clone() for k, v in model.state_dict().items() if k != VECTORS}
    start = getattr(model, VECTORS).detach().clone()
    train(model)
    after = model.state_dict()
    assert [k for k, v in before.items() if not torch.equal(v, after[k])] == []
    assert not torch.equal(start, getattr(model, VECTORS))
    assert [name for name, p in model.named_parameters() if p.requires_grad] == [VECTORS]
    assert model.trainable_parameters() == [getattr(model, VECTORS)]


def test_the_vectors_start_as_the_init_word_and_stand_for_the_token_in_prompts():
    model = tiny({"token": "sks", "init_word": "dog", "num_vectors": 1})
    encoder = model.cond_stage_model
    dog = encoder.embed_word("dog", "test")
    assert torch.equal(getattr(model, VECTORS).detach(), dog)
    with torch.no_grad():  # one vector equal to dog's embedding: "sks" reads exactly as "dog"
        assert torch.allclose(model.get_learned_conditioning(["a photo of sks"]),
                              model.get_learned_conditioning(["a photo of dog"]), atol=1e-6)
        plain = build_tiny_model().get_learned_conditioning(["a photo of a dog"])
        assert torch.equal(model.get_learned_conditioning(["a photo of a dog"]), plain)  # no token: as before


def test_a_multi_token_init_word_spreads_over_the_vectors_or_errors():
    rows = torch.arange(6.0).reshape(3, 2)
    assert spread(rows, 3, "w").tolist() == rows.tolist()
    assert spread(rows, 6, "w")[:, 0].tolist() == [0, 0, 2, 2, 4, 4]
    assert spread(rows[:1], 4, "w").tolist() == [[0, 1]] * 4
    with pytest.raises(UserError, match="is 3 tokens, more than the 2 vectors"):
        spread(rows, 2, "w")


def test_pivotal_tuning_trains_the_unet_beside_the_vectors_at_their_own_rate():
    model = tiny({"token": "sks", "init_word": "dog", "pivotal": True, "lr": 0.5})
    optimizer = model.configure_optimizers()
    groups = optimizer.param_groups
    assert [g.get("name") for g in groups] == [None, "embedding"] and groups[1]["lr"] == 0.5
    assert groups[0]["lr"] == 1e-3 and groups[1]["params"] == [getattr(model, VECTORS)]
    unet = next(model.model.parameters()).detach().clone()
    train(model, 1)
    assert not torch.equal(unet, next(model.model.parameters()))
    assert VECTORS not in model.step_state_dict() and VECTORS in model.state_dict()


@pytest.mark.parametrize("options, overrides, message", [
    ({"num_vectors": 0}, {}, "--num_vectors 0: expected 1 to 75"),
    ({"lr": -1.0}, {}, "--embedding_lr -1.0"),
    ({"stop_step": 5}, {}, "the embedding is all that trains"),
    ({"colour": 1}, {}, "unexpected keyword argument 'colour'"),
    ({}, {"cond_stage_trainable": True}, "cond_stage_trainable is true"),
])
def test_bad_options_are_user_errors(options, overrides, message):
    with pytest.raises(UserError, match=message):
        build_tiny_model(embedding={"token": "sks", **options}, **overrides)


def test_a_token_that_is_two_words_is_refused_and_a_common_word_warns(caplog):
    with pytest.raises(UserError, match="must be one word"):
        tiny({"token": "my dog", "init_word": "dog"})
    tiny({"token": "cat", "init_word": "dog"})
    assert "'cat' is a common word to CLIP" in caplog.text


def test_options_default_to_the_original_learning_rate():
    assert EmbeddingOptions.from_config(None) is None
    assert EmbeddingOptions.from_config({"token": "sks"}).learning_rate == 5e-3
