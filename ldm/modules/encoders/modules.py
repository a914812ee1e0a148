"""CLIP text encoder used as the conditioning model of Stable Diffusion v1 (Radford et al. 2021, arXiv:2103.00020)."""
import logging
import os
from pathlib import Path
from typing import Any, Mapping

import torch
from torch import nn
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

from ldm.util import UserError

logger = logging.getLogger(__name__)

TOKENIZER_DIR = Path(__file__).resolve().parent / "clip_tokenizer"

# The text tower of OpenAI CLIP ViT-L/14, the conditioning model of SD v1; ids are CLIP's <|startoftext|>/<|endoftext|>.
VIT_L14_TEXT_CONFIG: dict[str, Any] = {
    "vocab_size": 49408,
    "hidden_size": 768,
    "intermediate_size": 3072,
    "projection_dim": 768,
    "num_hidden_layers": 12,
    "num_attention_heads": 12,
    "max_position_embeddings": 77,
    "hidden_act": "quick_gelu",
    "layer_norm_eps": 1e-5,
    "bos_token_id": 49406,
    "eos_token_id": 49407,  # CLIPTextModel pools at the first eos id; pad shares it, so the first one is the real end
    "pad_token_id": 49407,
}
TEXT_CONFIG_KEYS = frozenset(CLIPTextConfig.__annotations__)


class TextTransformer(nn.Module):
    """Holds the CLIPTextModel under `text_model` so state-dict keys read `transformer.text_model.*` as in SD v1."""

    def __init__(self, text_model: CLIPTextModel):
        super().__init__()
        self.text_model = text_model

    def forward(self, input_ids: torch.Tensor, clip_skip: int = 1) -> torch.Tensor:
        """Token ids [B, T] -> final-layer-normed output [B, T, hidden] of the `clip_skip`-th layer from the end."""
        # A1111 and kohya's convention: 1 is the last layer (last_hidden_state, no other states kept), 2 the one before.
        if clip_skip == 1:
            return self.text_model(input_ids=input_ids).last_hidden_state
        hidden_states = self.text_model(input_ids=input_ids, output_hidden_states=True).hidden_states
        return self.text_model.final_layer_norm(hidden_states[-clip_skip])


class FrozenCLIPEmbedder(nn.Module):
    """Prompts -> CLIP hidden states [B, max_length, hidden] `clip_skip` layers from the end, the UNet's context."""

    def __init__(
        self,
        version: str | None = None,
        max_length: int = 77,
        text_config: Mapping[str, Any] | None = None,
        freeze: bool = True,
        device: Any = None,
        clip_skip: int = 1,
        gradient_checkpointing: bool = False,
    ):
        super().__init__()
        del device  # accepted so CompVis configs that set it still load; the device comes from the parameters
        if version is not None and os.path.isdir(version):
            if text_config is not None:
                raise ValueError("text_config cannot override a text model loaded from a folder (version)")
            self.tokenizer = load_tokenizer(version)
            text_model = CLIPTextModel.from_pretrained(version, local_files_only=True)
        else:
            if version is not None:
                logger.info("version %r is not a local folder: using the built-in ViT-L/14 text config", version)
            self.tokenizer = load_tokenizer(TOKENIZER_DIR)
            text_model = CLIPTextModel(build_text_config(text_config))
        if max_length > text_model.config.max_position_embeddings:
            raise ValueError(f"max_length {max_length} > {text_model.config.max_position_embeddings} positions")
        self.max_length = max_length
        self.clip_skip = check_clip_skip(clip_skip, text_model.config.num_hidden_layers)
        self.transformer = TextTransformer(text_model)
        if gradient_checkpointing:  # recompute each layer's activations in backward; acts while the encoder trains
            enable = getattr(text_model, "activation_checkpointing_enable", None)  # transformers 5.x's new name
            if enable is not None:
                enable(activation_checkpointing_kwargs={"use_reentrant": False})
            else:
                text_model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        if freeze:
            self.freeze()
        else:
            self.requires_grad_(True)  # which keeps the layers after the clip_skip one frozen

    def requires_grad_(self, requires_grad: bool = True) -> "FrozenCLIPEmbedder":
        """As nn.Module's, but the layers after the `clip_skip` one stay frozen (no gradient reaches them; DDP errs)."""
        super().requires_grad_(requires_grad)
        self.transformer.text_model.encoder.layers[self.reached_layers:].requires_grad_(False)
        return self

    @property
    def reached_layers(self) -> int:
        """How many encoder layers the output depends on: those up to the `clip_skip`-th from the end."""
        return len(self.transformer.text_model.encoder.layers) - self.clip_skip + 1

    def freeze(self) -> None:
        """Put the encoder in eval mode and stop its gradients."""
        self.eval()
        for param in self.parameters():
            param.requires_grad = False

    def tokenize(self, text: list[str]) -> torch.Tensor:
        """Prompts -> ids [B, max_length]: <|startoftext|>, tokens cut to fit, <|endoftext|>, then padding."""
        batch = self.tokenizer(
            text, truncation=True, max_length=self.max_length, padding="max_length", return_tensors="pt"
        )
        self.warn_truncated(text)
        return batch["input_ids"]

    def warn_truncated(self, text: list[str]) -> None:
        """Log which words of each prompt fell past max_length tokens."""
        room = self.max_length - 2
        for index, ids in enumerate(self.tokenizer(text, add_special_tokens=False, verbose=False)["input_ids"]):
            if len(ids) > room:
                kept, dropped = self.ids_to_text(ids[:room]), self.ids_to_text(ids[room:])
                logger.warning(
                    "prompt %d is %d tokens, longer than %d: cut after %r; dropped %r",
                    index, len(ids) + 2, self.max_length, kept[-40:], dropped,
                )

    def ids_to_text(self, ids: list[int]) -> str:
        """Token ids -> text, with the end-of-word marks turned back into spaces."""
        # Not tokenizer.decode: CLIPTokenizer patches that onto its backend and a deepcopy or pickle loses the patch.
        text = self.tokenizer.convert_tokens_to_string(self.tokenizer.convert_ids_to_tokens(ids))
        return text.replace("</w>", " ").strip()

    def forward(self, text: list[str]) -> torch.Tensor:
        """Prompts -> hidden states of the `clip_skip`-th layer from the end [B, max_length, hidden]."""
        tokens = self.tokenize(text).to(self.transformer.text_model.embeddings.token_embedding.weight.device)
        return self.transformer(tokens, self.clip_skip)

    def encode(self, text: list[str]) -> torch.Tensor:
        """Same as forward (the CompVis conditioning API)."""
        return self(text)


def check_clip_skip(clip_skip: Any, n_layers: int) -> int:
    """`clip_skip` if it is an integer from 1 to `n_layers`, else a UserError saying what fits."""
    if isinstance(clip_skip, bool) or not isinstance(clip_skip, int) or not 1 <= clip_skip <= n_layers:
        raise UserError(f"clip_skip {clip_skip!r} (--clip_skip, model.params.cond_stage_config.params.clip_skip): "
                        f"expected an integer from 1 (the last layer) to {n_layers} (the text encoder's layers)")
    return clip_skip


def build_text_config(overrides: Mapping[str, Any] | None) -> CLIPTextConfig:
    """ViT-L/14 text config with `overrides` applied; an unknown key is an error."""
    overrides = dict(overrides or {})
    unknown = set(overrides) - TEXT_CONFIG_KEYS
    if unknown:
        raise KeyError(f"unknown text_config keys {sorted(unknown)}; expected some of {sorted(TEXT_CONFIG_KEYS)}")
    return CLIPTextConfig(**{**VIT_L14_TEXT_CONFIG, **overrides})


def load_tokenizer(folder: str | Path) -> CLIPTokenizer:
    """CLIP BPE tokenizer from a local folder (never the hub), checked to know CLIP's special tokens."""
    tokenizer = CLIPTokenizer.from_pretrained(str(folder), local_files_only=True)
    if (tokenizer.bos_token_id, tokenizer.eos_token_id) != (49406, 49407):
        ids = f"{tokenizer.bos_token_id}/{tokenizer.eos_token_id}"
        raise ValueError(f"tokenizer in {folder} is not CLIP's: bos/eos ids {ids}, expected 49406/49407")
    return tokenizer
