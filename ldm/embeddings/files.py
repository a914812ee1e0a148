"""Embedding files at sampling time: `--embedding FILE[:WORD]` specs, checked before any model loads, bound to their
words in a loaded model (a .pt's `name`, else the file's stem as A1111 does, or WORD), with what every image's
metadata records of them (file name, SHA-256, word)."""
import logging
import os
from pathlib import Path
from typing import Sequence

from torch import nn

from ldm.checkpoint import check_checkpoint_file, read_embedding
from ldm.util import UserError, file_sha256

logger = logging.getLogger(__name__)


def parse_embedding_spec(spec: str) -> tuple[str, str | None]:
    """`file.safetensors` (the word the file names) or `file.safetensors:word`; a path that exists as written keeps
    its colons."""
    path, sep, word = spec.rpartition(":")
    if not sep or not path or os.path.exists(spec) or "/" in word or "\\" in word:
        return spec, None
    if not word.strip():
        raise UserError(f"--embedding {spec}: expected FILE or FILE:WORD, e.g. {path}:sks")
    return path, word


def check_embedding_specs(specs: Sequence[str], where: str = "--embedding") -> None:
    """Refuse a missing or unreadable embedding file before any model is loaded; `where` names the argument."""
    for spec in specs:
        path = parse_embedding_spec(spec)[0]
        check_checkpoint_file(path, f"{where} takes a textual-inversion embedding, .safetensors or .pt")
        read_embedding(path)


def apply_embedding_files(model: nn.Module, specs: Sequence[str]) -> list[dict]:
    """Bind each file's vectors to its word in `model` (a later file binding the same word wins) and return their
    metadata records `{"file", "sha256", "word", "vectors"}`; a width that is not the text encoder's is an error."""
    encoder, records = model.cond_stage_model, []
    table = encoder.transformer.text_model.embeddings.token_embedding.weight
    for spec in specs:
        path, word = parse_embedding_spec(spec)
        found = read_embedding(path)
        word = word or found.name
        if found.vectors.shape[1] != encoder.width:
            raise UserError(f"--embedding {path}: its vectors are {found.vectors.shape[1]} wide, but this model's text "
                            f"encoder takes {encoder.width} (an embedding for another model, e.g. SD 2 or SDXL?)")
        encoder.check_word(word, f"--embedding {path}")
        if word in model.sampling_words:
            logger.warning("--embedding %s: the word %r was already bound by an earlier file; this one wins", path,
                           word)
        model.sampling_words[word] = found.vectors.to(table.device, table.dtype)
        logger.info("--embedding %s: %r stands for %d vector%s", path, word, len(found.vectors),
                    "s" if len(found.vectors) > 1 else "")
        records.append({"file": Path(path).name, "sha256": file_sha256(path), "word": word,
                        "vectors": len(found.vectors)})
    return records


def warn_unused(records: Sequence[dict], prompts: Sequence[str]) -> None:
    """Warn about an embedding whose word no prompt says (the file's stem is its word unless FILE:WORD names one)."""
    for record in records:
        if not any(record["word"].lower() in prompt.lower() for prompt in prompts):
            logger.warning("--embedding %s binds %r, which no prompt says; bind another word with %s:WORD",
                           record["file"], record["word"], record["file"])
