"""CLIP text encoder used as the conditioning model of Stable Diffusion v1 (Radford et al. 2021, arXiv:2103.00020)."""
import logging
import os
from pathlib import Path
from typing import Any, Mapping, Optional

import torch
from torch import nn
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

from ldm.modules.encoders.bound_words import COMMON_RANK, splice
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
        self._spliced: Optional[tuple[torch.Tensor, torch.Tensor]] = None
        text_model.embeddings.token_embedding.register_forward_hook(self._splice)

    def forward(self, input_ids: torch.Tensor, clip_skip: int = 1, slots: Optional[torch.Tensor] = None,
                vectors: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Token ids [B, T] -> final-layer-normed output [B, T, hidden] of the `clip_skip`-th layer from the end;
        where the mask `slots` [B, T] is true, the token embeddings are `vectors` [slots, hidden] in order."""
        self._spliced = None if slots is None else (slots, vectors)
        try:
            # A1111 and kohya's convention: 1 is the last layer (last_hidden_state, no other states kept).
            if clip_skip == 1:
                return self.text_model(input_ids=input_ids).last_hidden_state
            hidden_states = self.text_model(input_ids=input_ids, output_hidden_states=True).hidden_states
            return self.text_model.final_layer_norm(hidden_states[-clip_skip])
        finally:
            self._spliced = None

    def _splice(self, module: nn.Module, args: Any, output: torch.Tensor) -> Optional[torch.Tensor]:
        """The token embeddings with the bound words' vectors in their slots (a forward hook of token_embedding)."""
        if self._spliced is None:
            return None
        slots, vectors = self._spliced
        return output.masked_scatter(slots[..., None], vectors.to(output.dtype))


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

    def forward(self, text: list[str], words: Optional[Mapping[str, torch.Tensor]] = None) -> torch.Tensor:
        """Prompts -> hidden states of the `clip_skip`-th layer from the end [B, max_length, hidden]; each word of
        `words` stands for its vectors [N, hidden] (textual inversion)."""
        device = self.transformer.text_model.embeddings.token_embedding.weight.device
        if not words:
            return self.transformer(self.tokenize(text).to(device), self.clip_skip)
        tokens, slots, picks = self.tokenize_bound(text, {word: len(v) for word, v in words.items()})
        vectors = torch.cat([v.to(device) for v in words.values()])[picks.to(device)]
        return self.transformer(tokens.to(device), self.clip_skip, slots.to(device), vectors)

    def encode(self, text: list[str], words: Optional[Mapping[str, torch.Tensor]] = None) -> torch.Tensor:
        """Same as forward (the CompVis conditioning API)."""
        return self(text, words)

    def tokenize_bound(self, text: list[str], counts: Mapping[str, int]
                       ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Prompts -> ids [B, max_length] as `tokenize` makes them, with each word of `counts` given way to its
        vectors' slots; the slot mask [B, max_length]; for each slot in order, its row among the words' vectors."""
        words = [(self.tokenizer(word, add_special_tokens=False)["input_ids"], n) for word, n in counts.items()]
        starts = [sum(n for _, n in words[:w]) for w in range(len(words))]
        room, tokenizer = self.max_length - 2, self.tokenizer
        rows, masks, picks = [], [], []
        for index, ids in enumerate(tokenizer(text, add_special_tokens=False, verbose=False)["input_ids"]):
            items = splice(ids, words)
            if len(items) > room:
                logger.warning("prompt %d is %d tokens with its embeddings' vectors, longer than %d: cut after %d",
                               index, len(items) + 2, self.max_length, room)
                items = items[:room]
            pad = [tokenizer.pad_token_id] * (room - len(items))
            rows.append([tokenizer.bos_token_id, *(i if isinstance(i, int) else words[i[0]][0][0] for i in items),
                         tokenizer.eos_token_id, *pad])
            masks.append([False, *(not isinstance(i, int) for i in items), False, *(False for _ in pad)])
            picks += [starts[i[0]] + i[1] for i in items if not isinstance(i, int)]
        return torch.tensor(rows), torch.tensor(masks), torch.tensor(picks, dtype=torch.long)

    def check_word(self, word: str, where: str) -> None:
        """Refuse a word that cannot be bound to vectors (`where` names the flag or file); warn when prompts may not
        find it, or when it is a common word that every prompt saying it would lose."""
        if not word or any(c.isspace() for c in word):
            raise UserError(f"{where}: the word {word!r} cannot be bound to an embedding: it must be one word, "
                            "without spaces")
        ids = self.tokenizer(word, add_special_tokens=False)["input_ids"]
        specials = {self.tokenizer.bos_token_id, self.tokenizer.eos_token_id}
        if not ids or specials.intersection(ids):
            raise UserError(f"{where}: the tokenizer reads {word!r} as {'nothing' if not ids else 'a special token'}; "
                            "choose another word")
        read = self.ids_to_text(ids)
        if read != word.lower():
            logger.warning("%s: the tokenizer splits %r into %d tokens (%r): a prompt finds it only where it is "
                           "written apart (punctuation glued to it changes its tokens)", where, word, len(ids), read)
        elif len(ids) == 1 and ids[0] < COMMON_RANK:
            logger.warning("%s: %r is a common word to CLIP (vocabulary rank %d): every prompt that says it gets the "
                           "embedding instead, class prompts too; a rare token such as sks avoids that "
                           "(scripts/find_rare_token.py)", where, word, ids[0])

    def embed_word(self, word: str, where: str) -> torch.Tensor:
        """The token embeddings [tokens, hidden] of a word, as the text encoder holds them (a copy)."""
        ids = self.tokenizer(word, add_special_tokens=False)["input_ids"]
        if not ids:
            raise UserError(f"{where}: the tokenizer reads no token in {word!r}; choose another word")
        table = self.transformer.text_model.embeddings.token_embedding.weight
        return table[torch.tensor(ids, device=table.device)].detach().clone()

    @property
    def width(self) -> int:
        """The width of a token embedding (hidden_size)."""
        return self.transformer.text_model.embeddings.token_embedding.weight.shape[1]


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
