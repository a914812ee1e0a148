"""Identifier candidates: short whole-word tokens late in CLIP's BPE merges (rare strings), each one token, and
given a checkpoint ranked by how weak the base model's prior for them is:

    python scripts/find_rare_token.py                                    # candidates by merge rank alone
    python scripts/find_rare_token.py --ckpt sd-v1-5.safetensors --class_word dog --samples 2 --top 20

The text score is the relative change of the text embedding that "a photo of a <token> dog" makes against
"a photo of a dog"; with --samples, the best --top by it are drawn at fixed seeds with both prompts and ranked by
the mean pixel change. Lower is a weaker prior. `sks` is always listed, to show where it falls (it is also a rifle).
Writes the table to --out (CSV) and prints the best.
"""
import argparse
import sys
from pathlib import Path
from typing import Optional, Sequence

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from ldm.cli import run_command  # noqa: E402
from ldm.eval.rare_tokens import candidates, image_changes, text_changes  # noqa: E402
from ldm.inference.loading import choose_device, load_model, sampling_config  # noqa: E402
from ldm.inference.sampling import sampling_mode  # noqa: E402
from ldm.modules.encoders.modules import TOKENIZER_DIR, load_tokenizer  # noqa: E402
from ldm.util import UserError, atomic_write_text  # noqa: E402


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add = parser.add_argument
    add("--ckpt", default=None, help="rank by this model's prior (an SD v1 file or diffusers folder)")
    add("--config", default=None, help="its model config (default: as stable_txt2img.py chooses)")
    add("--class_word", default="dog")
    add("--min_rank", type=int, default=40000, help="the first merge rank counted as rare (of 49408)")
    add("--min_length", type=int, default=3)
    add("--max_length", type=int, default=4)
    add("--samples", type=int, default=0, help="fixed-seed samples per prompt for the image score (0: text only)")
    add("--top", type=int, default=20, help="how many of the best by text score get the image score")
    add("--steps", type=int, default=25, help="DDIM steps of those samples")
    add("--show", type=int, default=15, help="rows to print")
    add("--out", default="outputs/rare_tokens.csv", help="the whole table")
    add("--device", default="auto")
    return parser.parse_args(argv)


def table(rows) -> str:
    lines = [f"{'#':>4}  {'token':<8} {'rank':>6}  {'text':>7}  {'image':>7}"]
    for k, c in rows:
        text = "" if c.text_change is None else f"{c.text_change:7.4f}"
        image = "" if c.image_change is None else f"{c.image_change:7.4f}"
        lines.append(f"{k:>4}  {c.token:<8} {c.rank:>6}  {text:>7}  {image:>7}")
    return "\n".join(lines)


def main(argv: Optional[Sequence[str]] = None) -> int:
    opt = parse_args(argv)

    def work() -> str:
        if opt.samples < 0 or opt.top < 1 or opt.min_length < 1 or opt.max_length < opt.min_length:
            raise UserError("need --samples >= 0, --top >= 1 and 1 <= --min_length <= --max_length")
        found = candidates(load_tokenizer(TOKENIZER_DIR), opt.min_rank, opt.min_length, opt.max_length)
        if opt.ckpt:
            device = choose_device(opt.device)
            model = load_model(sampling_config(opt.config, opt.ckpt), opt.ckpt, device)
            with sampling_mode(model):
                text_changes(model, found, opt.class_word)
                found.sort(key=lambda c: c.text_change)
                if opt.samples:
                    best = found[:opt.top] + [c for c in found[opt.top:] if c.token == "sks"]
                    image_changes(model, best, opt.class_word, list(range(opt.samples)), opt.steps)
                    found.sort(key=lambda c: (c.image_change is None, c.image_change or 0.0, c.text_change))
        else:
            found.sort(key=lambda c: -c.rank)
        rows = list(enumerate(found, start=1))
        out = Path(opt.out)
        out.parent.mkdir(parents=True, exist_ok=True)
        lines = ["position,token,rank,text_change,image_change"] + [
            f"{k},{c.token},{c.rank},{'' if c.text_change is None else c.text_change},"
            f"{'' if c.image_change is None else c.image_change}" for k, c in rows]
        atomic_write_text(out, "\n".join(lines) + "\n")
        shown = rows[:opt.show] + [(k, c) for k, c in rows[opt.show:] if c.token == "sks"]
        order = "image change, then text change" if opt.samples and opt.ckpt else \
            "text change" if opt.ckpt else "merge rank, rarest first"
        return (f"{len(found)} candidates (one token each, {opt.min_length}-{opt.max_length} letters, merge rank >= "
                f"{opt.min_rank}, and sks), by {order}; all in {out}\n" + table(shown))
    return run_command(work)


if __name__ == "__main__":
    sys.exit(main())
