"""Learning-rate schedules: each named schedule equals its closed form at chosen steps, CompVis' LambdaLinearScheduler
configs keep working, and the model hands Lightning a per-step scheduler only when one is asked for."""
import math
from types import SimpleNamespace

import pytest
import torch

from ldm.optim.schedules import LambdaLinearScheduler, LRSchedule
from ldm.util import UserError
from tests.helpers.models import build_tiny_model

MAX, WARMUP = 100, 10


@pytest.mark.parametrize("name, options, expected", [
    ("constant_with_warmup", {}, {0: 0.0, 5: 0.5, 10: 1.0, 99: 1.0}),
    ("linear", {}, {5: 0.5, 10: 1.0, 55: 0.5, 100: 0.0}),
    ("linear", {"min_lr_ratio": 0.1}, {5: 0.5, 55: 0.1 + 0.9 * 0.5, 100: 0.1}),
    ("cosine", {}, {5: 0.5, 10: 1.0, 32: 0.5 * (1 + math.cos(math.pi * 22 / 90)), 55: 0.5, 100: 0.0}),
    ("cosine_with_restarts", {"num_cycles": 2},
     {10: 1.0, 32: 0.5 * (1 + math.cos(math.pi * 44 / 90)), 55: 1.0, 77: 0.5 * (1 + math.cos(math.pi * 44 / 90)),
      100: 0.0}),
    ("polynomial", {"power": 2.0}, {5: 0.5, 55: 0.25, 100: 0.0}),
])
def test_each_schedule_equals_its_closed_form(name, options, expected):
    schedule = LRSchedule(name=name, warmup_steps=WARMUP, **options)
    schedule.check()
    for step, factor in expected.items():
        assert schedule.factor(step, MAX) == pytest.approx(factor, abs=1e-12), step


def test_warmup_below_one_is_a_fraction_of_max_steps():
    assert LRSchedule("linear", warmup_steps=0.1).warmup(MAX) == 10
    assert LRSchedule("linear", warmup_steps=0.1).factor(5, MAX) == pytest.approx(0.5)


def test_compvis_lambda_linear_scheduler_of_the_sd_configs():
    sd = LambdaLinearScheduler(warm_up_steps=[10000], cycle_lengths=[10000000000000], f_start=[1.e-6], f_max=[1.],
                               f_min=[1.])
    assert sd.schedule(0) == pytest.approx(1e-6) and sd.schedule(5000) == pytest.approx(0.5 + 0.5e-6)
    assert sd.schedule(10000) == 1.0 and sd.schedule(50000) == 1.0
    two = LambdaLinearScheduler(warm_up_steps=[2, 4], cycle_lengths=[10, 20], f_start=[0.0, 0.5], f_max=[1.0, 1.0],
                                f_min=[0.0, 0.5])
    assert [two.schedule(n) for n in (1, 2, 6, 10)] == pytest.approx([0.5, 0.8, 0.4, 0.0])
    assert [two.schedule(n) for n in (12, 14, 20)] == pytest.approx([0.75, 1.0 - 0.5 * 4 / 20, 1.0 - 0.5 * 10 / 20])


def attached(model, max_steps: int):
    model.trainer = SimpleNamespace(max_steps=max_steps)
    model.learning_rate = 1e-3
    return model


def test_the_model_steps_the_schedule_every_optimizer_step():
    model = attached(build_tiny_model(lr_schedule={"name": "linear", "warmup_steps": 2}), max_steps=6)
    config = model.configure_optimizers()
    assert config["lr_scheduler"]["interval"] == "step"
    optimizer, scheduler = config["optimizer"], config["lr_scheduler"]["scheduler"]
    rates = []
    for _ in range(6):
        rates.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    assert rates == pytest.approx([0.0, 5e-4, 1e-3, 7.5e-4, 5e-4, 2.5e-4])


def test_compvis_scheduler_config_is_used_as_the_factor():
    config = {"target": "ldm.lr_scheduler.LambdaLinearScheduler",
              "params": {"warm_up_steps": [4], "cycle_lengths": [100], "f_start": [0.0], "f_max": [1.0],
                         "f_min": [1.0]}}
    model = attached(build_tiny_model(scheduler_config=config), max_steps=10)
    optimizer = model.configure_optimizers()["optimizer"]
    assert optimizer.param_groups[0]["lr"] == 0.0
    assert isinstance(attached(build_tiny_model(), 10).configure_optimizers(), torch.optim.AdamW)


@pytest.mark.parametrize("options, message", [
    ({"lr_schedule": {"name": "cosine_annealing"}}, "lr_schedule 'cosine_annealing' .--lr_scheduler.: expected one of"),
    ({"lr_schedule": {"name": "constant", "warmup_steps": 5}}, "choose --lr_scheduler constant_with_warmup"),
    ({"lr_schedule": {"name": "cosine", "warmpu_steps": 5}}, "model.params.lr_schedule: .*warmpu_steps"),
    ({"lr_schedule": {"name": "linear", "min_lr_ratio": 2}}, "min_lr_ratio 2 is not within"),
    ({"lr_schedule": {"name": "linear"}, "scheduler_config": {"target": "ldm.lr_scheduler.LambdaLinearScheduler"}},
     "are both set: keep one"),
])
def test_schedule_mistakes_are_clear_errors(options, message):
    with pytest.raises(UserError, match=message):
        build_tiny_model(**options)
