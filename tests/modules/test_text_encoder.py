"""FrozenCLIPEmbedder: packaged tokenizer, SD v1 state-dict layout, parity with transformers, offline construction."""
import logging
import socket

import pytest
import torch
from transformers import CLIPTextConfig, CLIPTextModel

from ldm.modules.encoders.modules import FrozenCLIPEmbedder, load_tokenizer
from ldm.util import count_params
from tests.helpers.specs import read_spec

TINY = {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 2}
SKS_DOG_IDS = [49406, 320, 1125, 539, 48136, 1929] + [49407] * 71  # "a photo of sks dog" from OpenAI's CLIP tokenizer


@pytest.fixture
def no_network(monkeypatch):
    """Record (and refuse) every attempt to open a connection; the hub is also switched offline."""
    attempts = []

    def refuse(*args, **kwargs):
        attempts.append(args)
        raise OSError("network access attempted in a test")

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)
    return attempts


@pytest.fixture
def tiny_embedder(no_network) -> FrozenCLIPEmbedder:
    torch.manual_seed(0)
    embedder = FrozenCLIPEmbedder(version="openai/clip-vit-large-patch14", text_config=TINY)
    with torch.no_grad():
        for param in embedder.parameters():  # move layer norms off 1/0 so a swapped weight would show
            param.add_(0.02 * torch.randn_like(param))
    assert no_network == []
    return embedder


def test_packaged_tokenizer_ids(tiny_embedder):
    ids = tiny_embedder.tokenize(["a photo of sks dog", "a photo of a dog"])
    assert ids.shape == (2, 77) and ids.dtype == torch.long
    assert ids[0].tolist() == SKS_DOG_IDS
    assert len(tiny_embedder.tokenizer) == 49408


def test_full_size_state_dict_matches_sd_v1_spec(no_network):
    prefix = "cond_stage_model."
    expected = {key[len(prefix):]: shape for key, shape in read_spec().items()
                if key.startswith(prefix + "transformer.text_model.")}
    assert len(expected) == 196
    with torch.device("meta"):
        embedder = FrozenCLIPEmbedder()
    actual = {key: tuple(value.shape) for key, value in embedder.state_dict().items()}
    assert actual == expected  # in particular no persistent `position_ids` buffer
    n_params = count_params(embedder)
    print(f"FrozenCLIPEmbedder ViT-L/14 parameters: {n_params / 1e6:.2f} M")
    assert n_params == 123_060_480


def test_parity_with_transformers_clip_text_model(tiny_embedder):
    reference = CLIPTextModel(CLIPTextConfig(**TINY, attn_implementation="eager")).eval()
    weights = {k.removeprefix("transformer.text_model."): v for k, v in tiny_embedder.state_dict().items()}
    reference.load_state_dict(weights, strict=True)
    with torch.no_grad():
        ours = tiny_embedder(["a photo of sks dog"])
        theirs = reference(input_ids=torch.tensor([SKS_DOG_IDS])).last_hidden_state
    assert ours.shape == (1, 77, 32)
    err = (ours - theirs).abs().max().item()
    assert err <= 1e-5, f"max abs diff vs transformers CLIPTextModel: {err:.3e}"
    print(f"parity max abs diff: {err:.3e}")


def test_long_prompt_warns_where_it_was_cut(tiny_embedder, caplog):
    prompt = " ".join(["dog"] * 80) + " zebra giraffe"
    with caplog.at_level(logging.WARNING, logger="ldm.modules.encoders.modules"):
        ids = tiny_embedder.tokenize([prompt, "a photo of sks dog"])
    assert ids.shape == (2, 77) and ids[0, -1].item() == 49407
    messages = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(messages) == 1, messages
    assert "prompt 0" in messages[0] and "dog dog dog dog dog zebra giraffe" in messages[0]


def test_freeze_flag_and_unknown_config_key(no_network):
    frozen = FrozenCLIPEmbedder(text_config=TINY)
    assert not frozen.training and not any(p.requires_grad for p in frozen.parameters())
    trainable = FrozenCLIPEmbedder(text_config=TINY, freeze=False)
    assert trainable.training and all(p.requires_grad for p in trainable.parameters())
    trainable(["a photo of sks dog"]).sum().backward()
    assert trainable.transformer.text_model.embeddings.token_embedding.weight.grad is not None
    with pytest.raises(KeyError, match="hidden_sise"):
        FrozenCLIPEmbedder(text_config={"hidden_sise": 32})


def test_loads_tokenizer_and_model_from_local_folder(tmp_path, tiny_embedder):
    tiny_embedder.transformer.text_model.save_pretrained(tmp_path)
    tiny_embedder.tokenizer.save_pretrained(tmp_path)
    loaded = FrozenCLIPEmbedder(version=str(tmp_path))
    assert load_tokenizer(tmp_path)("a photo of sks dog")["input_ids"] == SKS_DOG_IDS[:7]
    with torch.no_grad():
        assert torch.equal(loaded(["a photo of sks dog"]), tiny_embedder(["a photo of sks dog"]))
    with pytest.raises(ValueError, match="text_config"):
        FrozenCLIPEmbedder(version=str(tmp_path), text_config=TINY)
