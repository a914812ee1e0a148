"""EMA of the trained weights: the update and its warm-up, kept under the LitEma names in step files and last.ckpt,
carried on by a resume, and chosen at sampling with --use_ema (a run config's use_ema builds no second copy;
end to end: tests/e2e/test_ema_e2e.py)."""
import torch

from ldm.modules.ema import LitEma
from tests.helpers.models import build_tiny_model


def test_the_update_and_its_warm_up():
    model = torch.nn.Linear(2, 2)
    for warmup, first_decay in ((False, 0.9), (True, 2 / 11)):
        ema = LitEma(model, decay=0.9, use_num_updates=warmup)
        start = model.weight.detach().clone()
        with torch.no_grad():
            model.weight.add_(1.0)
        ema(model)
        expected = first_decay * start + (1 - first_decay) * model.weight.detach()
        assert torch.allclose(ema.weight, expected, atol=1e-6), warmup
        with torch.no_grad():
            model.weight.sub_(1.0)
    assert set(dict(ema.named_buffers())) == {"decay", "num_updates", "weight", "bias"}


def test_a_float32_average_of_bf16_weights_with_the_exact_decay():
    model = torch.nn.Linear(4, 4).to(torch.bfloat16)
    ema = LitEma(model, decay=0.9999, use_num_updates=False)
    model.to(torch.bfloat16), ema.to(torch.bfloat16)  # what bf16-true does to the whole LightningModule
    start = model.weight.detach().double()
    with torch.no_grad():
        model.weight.add_(1.0)
    for _ in range(20):
        ema(model)
    expected = model.weight.detach().double() + (start - model.weight.detach().double()) * 0.9999 ** 20
    assert ema.weight.dtype == torch.float32 and ema.decay.dtype == torch.float32
    assert ema.decay_rate == 0.9999 and ema.decay.item() == torch.tensor(0.9999).item()
    assert torch.allclose(ema.weight.double(), expected, atol=1e-5)  # a bf16 shadow would not have moved
    assert not torch.equal(ema.weight, start.float())


def test_old_checkpoints_load_and_the_saved_keys_stay():
    model = torch.nn.Linear(2, 2)
    old = {"decay": torch.tensor(0.5), "num_updates": torch.tensor(7, dtype=torch.int),
           "weight": torch.full((2, 2), 3.0, dtype=torch.float16), "bias": torch.zeros(2)}
    ema = LitEma(model, decay=0.5)
    ema.load_state_dict(old)
    assert set(ema.state_dict()) == set(old) and ema.weight.dtype == torch.float32
    assert ema.next_decay() == 0.5 and int(ema.num_updates) == 8  # counts on from the file's 7
    ema.to(torch.float16)
    assert torch.equal(ema.weight, torch.full((2, 2), 3.0))


def test_the_average_is_left_out_of_ddp_buffer_sync_and_can_stay_on_the_cpu(tmp_path):
    model = build_tiny_model(use_ema=True)
    ignored = set(model._ddp_params_and_buffers_to_ignore)
    assert ignored == {f"model_ema.{name}" for name, _ in model.model_ema.named_buffers()} and ignored
    torch.distributed.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    try:
        ddp = torch.nn.parallel.DistributedDataParallel(model)
        synced = {id(b) for b in ddp.modules_buffers}
        assert not synced & {id(b) for b in model.model_ema.buffers()}
        assert synced  # the schedule's buffers are still synced
    finally:
        torch.distributed.destroy_process_group()
    pinned = LitEma(torch.nn.Linear(2, 2), device="cpu")
    pinned.to("meta")
    assert pinned.weight.device.type == "cpu"
