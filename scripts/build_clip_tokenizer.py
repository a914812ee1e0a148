"""Build the CLIP tokenizer files (Hugging Face `vocab.json` + `merges.txt`) from OpenAI's BPE merge list.

The merge list `bpe_simple_vocab_16e6.txt.gz` ships inside the `open-clip-torch` wheel; get it offline-ready with
`pip download --no-deps open-clip-torch` and pass either the wheel or the extracted `.gz` file.
"""
import argparse
import gzip
import json
import sys
import zipfile
from pathlib import Path
from typing import Optional, Sequence

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from ldm.cli import run_command  # noqa: E402

BPE_NAME = "bpe_simple_vocab_16e6.txt.gz"
NUM_MERGES = 49152 - 256 - 2  # CLIP's vocab is 49408 = 2 * 256 byte tokens + 48894 merges + 2 specials
SPECIAL_TOKENS = ("<|startoftext|>", "<|endoftext|>")
DEFAULT_OUT = Path(__file__).resolve().parent.parent / "ldm" / "modules" / "encoders" / "clip_tokenizer"


def byte_unicode_chars() -> list[str]:
    """The 256 printable characters GPT-2/CLIP byte-level BPE uses for bytes 0..255, in CLIP's vocab order."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    chars = [chr(b) for b in printable]
    shifted = 0
    for b in range(256):
        if b not in printable:
            chars.append(chr(256 + shifted))
            shifted += 1
    return chars


def read_bpe_text(source: Path) -> str:
    """Return the decompressed merge list from a `.gz` file or from a wheel that carries it."""
    if zipfile.is_zipfile(source):
        with zipfile.ZipFile(source) as wheel:
            members = [name for name in wheel.namelist() if name.endswith("/" + BPE_NAME) or name == BPE_NAME]
            if not members:
                raise FileNotFoundError(f"{source} holds no {BPE_NAME}")
            data = wheel.read(members[0])
    else:
        data = source.read_bytes()
    return gzip.decompress(data).decode("utf-8")


def build(bpe_text: str) -> tuple[dict[str, int], list[str]]:
    """Return (token -> id, merge lines) exactly as CLIP builds them: bytes, bytes+'</w>', merges, specials."""
    merges = bpe_text.split("\n")[1 : NUM_MERGES + 1]  # line 0 is a header
    if len(merges) != NUM_MERGES or any(len(m.split()) != 2 for m in merges):
        raise ValueError(f"expected {NUM_MERGES} merge lines of two symbols after the header")
    byte_chars = byte_unicode_chars()
    tokens = byte_chars + [c + "</w>" for c in byte_chars] + ["".join(m.split()) for m in merges] + list(SPECIAL_TOKENS)
    vocab = {token: index for index, token in enumerate(tokens)}
    if len(vocab) != len(tokens):
        raise ValueError("duplicate tokens in the built vocabulary")
    return vocab, merges


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("source", type=Path, help=f"path to {BPE_NAME} or to an open_clip_torch-*.whl carrying it")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help=f"output folder (default: {DEFAULT_OUT})")
    args = parser.parse_args(argv)
    return run_command(lambda: write_tokenizer(args.source, args.out))


def write_tokenizer(source: Path, out: Path) -> str:
    """vocab.json and merges.txt in `out`, from the BPE file `source`; what was written."""
    vocab, merges = build(read_bpe_text(source))
    out.mkdir(parents=True, exist_ok=True)
    vocab_path, merges_path = out / "vocab.json", out / "merges.txt"
    vocab_path.write_text(json.dumps(vocab, ensure_ascii=False) + "\n", encoding="utf-8")
    merges_path.write_text("#version: 0.2\n" + "\n".join(merges) + "\n", encoding="utf-8")
    return (f"wrote {vocab_path} ({len(vocab)} tokens, {vocab_path.stat().st_size} bytes)\n"
            f"wrote {merges_path} ({len(merges)} merges, {merges_path.stat().st_size} bytes)")


if __name__ == "__main__":
    sys.exit(main())
