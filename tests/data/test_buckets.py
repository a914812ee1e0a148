"""Aspect buckets: valid buckets, each photo at the nearest one without distortion, batches of one bucket with the
class examples in a bucket of their own, two forwards when the sizes differ (a run that trains with them:
tests/e2e/test_buckets_e2e.py)."""
import math

import numpy as np
import pytest
import torch
import torch.distributed as dist
from PIL import Image

from ldm.data.buckets import BucketBatches, bucket_box, bucket_sizes, nearest_bucket
from ldm.data.image_files import DataError
from ldm.data.personalized import PersonalizedBase
from tests.helpers.models import build_tiny_model

PHOTOS = {"wide.png": (300, 160), "tall.png": (150, 310), "square.png": (200, 200), "photo.jpg": (400, 300)}


@pytest.mark.parametrize("size", [192, 512, 768])
def test_buckets_are_valid_and_photos_land_at_the_nearest(size):
    buckets = bucket_sizes(size)
    assert (size, size) in buckets and len(buckets) >= 3
    for width, height in buckets:
        assert width % 64 == height % 64 == 0 and width * height <= size * size
        assert max(width / height, height / width) <= 2
    for photo in [(4032, 3024), (3024, 4032), (1920, 1080), (1000, 1000), (3000, 1000), (640, 1280)]:
        bucket = nearest_bucket(*photo, buckets)
        error = abs(math.log(bucket[0] / bucket[1]) - math.log(photo[0] / photo[1]))
        assert all(error <= abs(math.log(b[0] / b[1]) - math.log(photo[0] / photo[1])) + 1e-12 for b in buckets)
        left, top, right, bottom = bucket_box(*photo, bucket)
        assert abs((right - left) / (bottom - top) - bucket[0] / bucket[1]) < 0.01
        assert 0 <= left and 0 <= top and right <= photo[0] and bottom <= photo[1]


@pytest.fixture
def photos(tmp_path):
    for name, size in PHOTOS.items():
        pixels = np.zeros((size[1], size[0], 3), np.uint8)
        pixels[:, : size[0] // 2] = (230, 20, 20)  # the left half red: distortion would not move it, a crop would
        Image.fromarray(pixels).save(tmp_path / name)
    return tmp_path


def test_each_photo_trains_at_its_bucket_and_keeps_its_aspect(photos):
    data = PersonalizedBase(str(photos), size=192, repeats=1, crop="none", buckets=True, flip_p=0.0)
    for k, path in enumerate(data.paths):
        width, height = data.target_size(k)
        image = data.image(k)
        assert image.shape == (height, width, 3)
        photo_w, photo_h = PHOTOS[path.name]
        assert abs(math.log(width / height) - math.log(photo_w / photo_h)) < 0.45
        red = (image[..., 0] > 0.5).float().mean(0)
        assert abs(float(red[: width // 2 - 2].min()) - 1) < 1e-6 and float(red[width // 2 + 2:].max()) == 0
    assert {data.target_size(k) for k in range(len(data.paths))} == {(256, 128), (128, 256), (192, 192)}
    with pytest.raises(DataError, match="buckets .* need crop: none"):
        PersonalizedBase(str(photos), size=192, repeats=1, crop="center", buckets=True)


def test_batches_come_from_one_bucket_and_class_examples_from_one_of_their_own():
    torch.manual_seed(0)
    instance = ["A", "A", "B", "B", "B"]
    keys = [(0, instance[i % 5]) for i in range(20)]
    batches = BucketBatches(keys, class_buckets=[["C", "D", "C"]], batch_size=3)
    seen = list(batches)
    assert len(seen) == len(batches) and sorted(i for b in seen for i, _ in b) == list(range(20))
    for batch in seen:
        assert len({instance[i % 5] for i, _ in batch}) == 1
        assert len({["C", "D", "C"][j] for _, j in batch}) == 1


def test_ranks_split_one_shuffle_into_as_many_batches_each_whatever_their_own_random_state(monkeypatch):
    keys = [(0, "AB"[i % 2]) for i in range(9)]  # 5 batches of 2 (A: 3, B: 2): one rank would take a step less
    batches = BucketBatches(keys, class_buckets=None, batch_size=2, seed=3)
    monkeypatch.setattr(dist, "is_initialized", lambda: True)
    monkeypatch.setattr(dist, "get_world_size", lambda: 2)
    epochs = []
    for _ in range(2):
        ranks = []
        for rank in (0, 1):
            monkeypatch.setattr(dist, "get_rank", lambda rank=rank: rank)
            torch.manual_seed(100 + rank)  # each rank's own timesteps and noise must not change its share
            batches.epoch = len(epochs)
            ranks.append(list(batches))
        assert len(ranks[0]) == len(ranks[1]) == len(batches) == 3
        assert sorted(i for share in ranks for batch in share for i in batch) == sorted([*range(9), *ranks[0][0]])
        epochs.append(ranks)
    assert epochs[0] != epochs[1], "the same order every epoch"


def test_examples_of_different_sizes_take_two_forwards():
    model = build_tiny_model()
    key, caption = model.first_stage_key, model.cond_stage_key
    batch = {key: torch.rand(2, 64, 128, 3) * 2 - 1, caption: ["photo of a sks dog"] * 2,
             f"class_{key}": torch.rand(2, 64, 64, 3) * 2 - 1, f"class_{caption}": ["photo of a dog"] * 2}
    assert model.sizes_differ(batch)
    torch.manual_seed(0)
    losses = model.shared_step(batch)
    torch.manual_seed(0)
    instance, _ = model.per_sample_losses({key: batch[key], caption: batch[caption]})
    prior, _ = model.per_sample_losses({key: batch[f"class_{key}"], caption: batch[f"class_{caption}"]})
    assert torch.equal(losses["loss_instance"], instance.mean()) and torch.equal(losses["loss_class"], prior.mean())
    with pytest.raises(ValueError, match="fixed t and noise"):
        model.shared_step(batch, t=torch.tensor([1, 2, 3, 4]))
