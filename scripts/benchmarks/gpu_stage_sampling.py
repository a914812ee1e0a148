"""sd-gpu-check's sampling stage process: DDIM through the sampling scripts' path, with and without a ControlNet."""
import sys
from pathlib import Path

BENCHMARKS = Path(__file__).resolve().parent
sys.path[:0] = [str(BENCHMARKS.parents[1]), str(BENCHMARKS.parent)]  # ldm, and benchmarks/

import torch  # noqa: E402

from benchmarks import device_check  # noqa: E402
from benchmarks.common import median_seconds  # noqa: E402
from benchmarks.device_check import run_stage  # noqa: E402
from ldm.config import latent_shape, load_config, read_yaml  # noqa: E402
from ldm.controlnet.stack import Control, ControlStack, controlled  # noqa: E402
from ldm.inference.loading import load_model, precision_scope  # noqa: E402
from ldm.inference.sampling import sample_once  # noqa: E402
from ldm.util import instantiate_from_config, reset_peak_memory  # noqa: E402


def worker_sampling(spec: dict) -> dict:
    """50 DDIM steps with guidance through the sampling path, then with a random ControlNet; times and peaks."""
    device, config = torch.device(spec["device"]), load_config(spec["config"])
    model = load_model(config, spec["ckpt"], device, precision="autocast")  # fp16 weights on a GPU, as users sample
    scope = precision_scope("autocast", device)
    shape = latent_shape(config, spec["size"], spec["size"])

    def sample() -> torch.Tensor:
        return sample_once(model, "ddim", spec["steps"], 1, shape, 7.5, scope)

    result = {"plain_s": median_seconds([sample], spec["repeats"], device)[0], **device_check.cuda_peaks(device)}
    reset_peak_memory(device)  # the ControlNet's peaks are its own
    torch.manual_seed(0)
    net = instantiate_from_config(read_yaml(spec["controlnet"]).model.params.control_stage_config)
    net = net.eval().requires_grad_(False).to(device, next(model.model.parameters()).dtype)
    hint = torch.rand(1, 3, spec["size"], spec["size"], device=device)
    with controlled(model, ControlStack([Control(net, hint)])):
        result["controlnet_s"] = median_seconds([sample], spec["repeats"], device)[0]
    peaks = device_check.cuda_peaks(device)
    return {**result, **{f"controlnet_{k}": v for k, v in peaks.items()}}


WORKERS = {"sampling": worker_sampling}

if __name__ == "__main__":
    sys.exit(run_stage(sys.argv[1], WORKERS))
