"""Aspect-ratio buckets (`crop: none` with `buckets: true`): each photo trains at the bucket nearest its aspect ratio
(sides multiples of 64, area at most size x size, ratio at most 2), cut only by the sliver that the bucket's ratio
leaves, instead of being squashed or cropped to a square. A batch comes from one bucket of one concept; class
examples take one bucket of their own per batch (`BucketBatches`), and the model runs the two in separate forwards
when they differ."""
import math
from typing import Hashable, Iterator, Optional, Sequence

import torch
import torch.distributed as dist

MULTIPLE, MAX_RATIO = 64, 2.0


def bucket_sizes(size: int, multiple: int = MULTIPLE, max_ratio: float = MAX_RATIO) -> list[tuple[int, int]]:
    """(width, height) of every bucket: for each width, the tallest height of at most size² pixels."""
    buckets = set()
    for width in range(multiple, int(size * math.sqrt(max_ratio)) + 1, multiple):
        height = (size * size // width) // multiple * multiple
        if height >= multiple and max(width / height, height / width) <= max_ratio:
            buckets.add((width, height))
    return sorted(buckets)


def nearest_bucket(width: int, height: int, buckets: Sequence[tuple[int, int]]) -> tuple[int, int]:
    """The bucket whose aspect ratio is closest to the photo's (in log ratio); the larger one on a tie."""
    ratio = math.log(width / height)
    return min(buckets, key=lambda b: (abs(math.log(b[0] / b[1]) - ratio), -b[0] * b[1]))


def bucket_box(width: int, height: int, bucket: tuple[int, int]) -> tuple[int, int, int, int]:
    """The centred crop box of the photo with the bucket's aspect ratio (what the bucket's ratio leaves over)."""
    scale = max(bucket[0] / width, bucket[1] / height)
    crop_w, crop_h = bucket[0] / scale, bucket[1] / scale
    left, top = (width - crop_w) / 2, (height - crop_h) / 2
    return round(left), round(top), round(left + crop_w), round(top + crop_h)


class BucketBatches:
    """Batches of item indices, or of (item index, class index) pairs: the items of a batch share a key (concept,
    bucket), and so do its class examples, which come from that concept's class images (their bucket drawn in
    proportion to them); shuffled every epoch from `seed` + epoch, alike on every rank; under DDP each rank takes
    every world-size-th batch (the list padded with its first batches, so that every rank takes as many steps), and
    draws its batches' class examples itself."""

    def __init__(self, keys: Sequence[tuple[int, Hashable]], class_buckets: Optional[Sequence[Sequence]],
                 batch_size: int, seed: int = 0):
        self.keys, self.batch_size, self.seed = list(keys), batch_size, seed
        self.class_buckets = None if class_buckets is None else [list(buckets) for buckets in class_buckets]
        self.epoch = 0

    def _batches(self, generator: torch.Generator) -> list[list[int]]:
        groups: dict = {}
        for index in torch.randperm(len(self.keys), generator=generator).tolist():
            groups.setdefault(self.keys[index], []).append(index)
        batches = [group[i:i + self.batch_size] for group in groups.values()
                   for i in range(0, len(group), self.batch_size)]
        return [batches[i] for i in torch.randperm(len(batches), generator=generator).tolist()]

    def _class_indices(self, concept: int, n: int) -> list[int]:
        buckets = self.class_buckets[concept]
        first = int(torch.randint(len(buckets), ()))
        same = [j for j, b in enumerate(buckets) if b == buckets[first]]
        order = torch.randperm(len(same)).tolist()
        return [same[order[k % len(same)]] for k in range(n)]

    def __iter__(self) -> Iterator[list]:
        rank, world = (dist.get_rank(), dist.get_world_size()) if dist.is_available() and dist.is_initialized() \
            else (0, 1)
        batches = self._batches(torch.Generator().manual_seed(self.seed + self.epoch))
        self.epoch += 1
        batches += [batches[k % len(batches)] for k in range(-len(batches) % world)]
        for batch in batches[rank::world]:
            if self.class_buckets is None:
                yield batch
            else:
                yield list(zip(batch, self._class_indices(self.keys[batch[0]][0], len(batch))))

    def __len__(self) -> int:
        counts: dict = {}
        for key in self.keys:
            counts[key] = counts.get(key, 0) + 1
        batches = sum(math.ceil(n / self.batch_size) for n in counts.values())
        world = dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1
        return math.ceil(batches / world)
