"""Extract a LoRA from a fine-tune and its base, or resize a LoRA file, by truncated SVD:

    python scripts/extract_lora.py dog.safetensors --base sd-v1-5.safetensors -o dog-lora.safetensors --rank 16
    python scripts/extract_lora.py dog.ckpt --base sd-v1-5.ckpt -o dog-lora.safetensors --energy 0.9 --max_rank 64
    python scripts/extract_lora.py --resize dog-lora.safetensors -o dog-r4.safetensors --rank 4

Each module's weight difference (fine-tune - base, in float32) becomes its best rank-r approximation (Eckart-Young),
written as a kohya-format LoRA (lora_down, lora_up, alpha = r) that merge_lora.py, --lora, A1111 and ComfyUI read.
--rank gives every module the same rank; --energy gives each the smallest rank that keeps that fraction of its
squared singular values. Modules the fine-tune left unchanged are left out (the text encoder's, when it was frozen).
"""
import argparse
import sys
from pathlib import Path
from typing import Optional, Sequence

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from ldm.checkpoint import (EMA_PREFIX, PRECISIONS, check_checkpoint_file, precision_dtype, read_lora,  # noqa: E402
                            read_state_dict, save_lora, to_sd_layout)
from ldm.checkpoint.fitting import check_fits  # noqa: E402
from ldm.cli import run_command  # noqa: E402
from ldm.config import DEFAULT_CONFIG, shown  # noqa: E402
from ldm.inference.loading import sampling_config  # noqa: E402
from ldm.lora.extraction import Extraction, RankRule, extract_lora, resize_lora  # noqa: E402
from ldm.lora.files import lora_names  # noqa: E402
from ldm.lora.names import TARGETS  # noqa: E402
from ldm.util import UserError, ensure_writable_dir, file_sha256, format_bytes, user_or_project_path  # noqa: E402

# kohya's metadata that describes the input file itself, not the resized one
RESIZED_AWAY = ("ss_network_dim", "ss_network_alpha", "ss_network_args", "sshs_model_hash", "sshs_legacy_hash")


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("finetune", nargs="?", type=user_or_project_path,
                        help="the fine-tuned SD v1 checkpoint (.ckpt, .safetensors or a diffusers folder)")
    parser.add_argument("--base", type=user_or_project_path, help="the checkpoint it was fine-tuned from")
    parser.add_argument("--resize", metavar="LORA", type=user_or_project_path,
                        help="a kohya-format LoRA file to write at a lower rank instead")
    parser.add_argument("-o", "--output", required=True, help="the LoRA file to write (.safetensors)")
    parser.add_argument("--rank", type=int, help="the rank of every module")
    parser.add_argument("--energy", type=float, help="per module, the smallest rank whose squared singular values keep "
                        "this fraction (0 < E <= 1) of the total")
    parser.add_argument("--max_rank", type=int, help="the highest rank --energy may choose (default: no cap)")
    parser.add_argument("--targets", choices=list(TARGETS), default="transformer", help="the UNet modules: every "
                        "Linear and 1x1 conv of its transformers (kohya's, default) or their attention only")
    parser.add_argument("--no_text_encoder", dest="text_encoder", action="store_false",
                        help="leave the text encoder out (default: its attention and MLP Linears, where they changed)")
    parser.add_argument("--conv", action="store_true", help="also the 3x3 convs of the UNet's ResBlocks (LoCon)")
    parser.add_argument("--config", type=user_or_project_path, default=None, help="the base's model config (default: "
                        f"as sampling chooses it, else {shown(DEFAULT_CONFIG)})")
    parser.add_argument("--save_precision", default="fp16", choices=list(PRECISIONS),
                        help="precision of the written LoRA (default: fp16)")
    return parser.parse_args(argv)


def check_inputs(opt: argparse.Namespace) -> tuple[Path, RankRule]:
    """The output path and the rank rule, every flag checked before a weight is read."""
    if opt.resize and (opt.finetune or opt.base):
        raise UserError("--resize takes a LoRA file alone: leave out the fine-tuned checkpoint and --base")
    if not opt.resize and not (opt.finetune and opt.base):
        raise UserError("give the fine-tuned checkpoint and the --base it was fine-tuned from (or --resize LORA)")
    rule = RankRule(opt.rank, opt.energy, opt.max_rank)
    output = Path(opt.output)
    if output.suffix != ".safetensors":
        raise UserError(f"{output}: a LoRA file is written as .safetensors (what other SD tools read)")
    for source in (opt.resize,) if opt.resize else (opt.finetune, opt.base):
        if Path(source).exists() and output.exists() and output.resolve() == Path(source).resolve():
            raise UserError(f"{output} is one of the inputs; write the LoRA to another file")
        check_checkpoint_file(source)
    ensure_writable_dir(output.parent, "-o")
    return output, rule


def extract(opt: argparse.Namespace, rule: RankRule, dtype) -> tuple[Extraction, str, dict[str, str]]:
    """The LoRA of the fine-tune's difference from its base, the base's SHA-256 and the file's metadata."""
    config = sampling_config(opt.config, opt.base)
    base = to_sd_layout(read_state_dict(opt.base))
    check_fits(config, {k: v for k, v in base.items() if not k.startswith(EMA_PREFIX)}, opt.base)
    tuned = to_sd_layout(read_state_dict(opt.finetune))
    names = lora_names(config.model)
    weights = [key.removesuffix(".weight") for key in base if key.endswith(".weight")]
    modules = names.targets(weights, opt.targets, opt.text_encoder) + (names.resnet_convs(weights) if opt.conv else [])
    extraction = extract_lora(base, tuned, names, modules, rule, dtype, (opt.finetune, opt.base))
    metadata = {"ss_base_model_version": "sd_v1", "ss_sd_model_name": Path(opt.base).name}
    return extraction, file_sha256(opt.base) if Path(opt.base).is_file() else "", metadata


def resize(opt: argparse.Namespace, rule: RankRule, dtype) -> tuple[Extraction, str, dict[str, str]]:
    """The LoRA file at the new ranks, its base's SHA-256 and its metadata (less what described the old ranks)."""
    tensors, metadata = read_lora(opt.resize)
    extraction = resize_lora(tensors, rule, dtype, opt.resize)
    kept = {key: value for key, value in metadata.items() if key not in RESIZED_AWAY}
    return extraction, metadata.get("ss_new_sd_model_hash", ""), kept


def run(opt: argparse.Namespace) -> str:
    """Extract or resize, write the file; one line per module group and one for the file."""
    output, rule = check_inputs(opt)
    dtype = precision_dtype(opt.save_precision, "--save_precision")
    extraction, base_hash, metadata = (resize if opt.resize else extract)(opt, rule, dtype)
    save_lora(extraction.tensors, output, base_hash, {**metadata, **extraction.metadata(rule)}, dtype)
    modules = sum(len(report.ranks) for report in extraction.groups.values())
    return "\n".join([*extraction.lines(), f"wrote {output} ({format_bytes(output.stat().st_size)}, {modules} "
                                           f"modules, {opt.save_precision})"])


def main(argv: Optional[Sequence[str]] = None) -> int:
    opt = parse_args(argv)
    return run_command(lambda: run(opt))


if __name__ == "__main__":
    sys.exit(main())
