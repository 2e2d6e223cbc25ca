"""The questions of one image together in a training batch (``data.image_group_size``): the epoch order keeps
them in runs, every item still once per epoch, a function of (seed, epoch); a VQA run trains with it."""

from collections import Counter

import pytest

from absvl.training.config import ConfigError, load_config
from absvl.training.data import EpochOrder, epoch_permutation, grouped_permutation

KEYS = [f"image{i // 10}" for i in range(10)] + [f"image{i}" for i in range(1, 40)]  # 10 questions of image0, ...


def _runs(order, keys):
    runs = []
    for index in order:
        if runs and runs[-1][0] == keys[index]:
            runs[-1][1] += 1
        else:
            runs.append([keys[index], 1])
    return runs


def test_grouped_order_keeps_an_images_questions_in_runs_of_the_group_size():
    keys = [f"img{i % 7}" for i in range(70)]  # 7 images, 10 questions each, interleaved
    order = grouped_permutation(keys, 4, seed=0, epoch=0)
    assert sorted(order) == list(range(70))  # every question once
    runs = _runs(order, keys)
    assert max(n for _, n in runs) == 4
    # each image's 10 questions in runs of 4, 4 and 2 (two runs of one image may meet: then 8 or 6 in a row)
    per_image = Counter()
    for key, n in runs:
        per_image[key] += n
    assert set(per_image.values()) == {10}
    assert sum(n == 4 for _, n in runs) >= 14 - sum(n > 4 for _, n in runs)
    assert order == grouped_permutation(keys, 4, seed=0, epoch=0)  # deterministic
    assert order != grouped_permutation(keys, 4, seed=0, epoch=1)
    assert grouped_permutation(keys, 1, seed=3, epoch=2) == epoch_permutation(70, 3, 2)


class _Grouped:
    group_keys = [f"img{i % 5}" for i in range(20)]
    group_size = 4

    def __len__(self):
        return 20

    def __getitem__(self, index):
        return index


def test_epoch_order_groups_a_dataset_that_declares_its_groups():
    dataset = _Grouped()
    order = [EpochOrder(dataset, seed=0, epoch=2)[i] for i in range(20)]
    assert order == grouped_permutation(dataset.group_keys, 4, 0, 2)
    assert all(n == 4 for _, n in _runs(order, dataset.group_keys[:]) if n < 8)
    assert [EpochOrder(dataset, 0, 2, shuffle=False)[i] for i in range(20)] == list(range(20))


def test_the_group_size_is_checked():
    with pytest.raises(ConfigError, match="data.image_group_size"):
        load_config("configs/shapes_absvit_tiny.yaml", ["data.image_group_size=0"])


def test_a_resume_compares_the_settings_the_checkpoint_recorded():
    from pathlib import Path

    from absvl.training.loop import check_resume

    saved = {"train.batch_size": 64, "data.root": "data/shapes"}  # written before data.image_group_size existed
    now = {**saved, "data.image_group_size": 4}
    check_resume(Path("ckpt"), saved, now, force=False)  # a setting absvl added since is not compared
    with pytest.raises(ConfigError, match="data.image_group_size was 1, now 4"):
        check_resume(Path("ckpt"), {**saved, "data.image_group_size": 1}, now, force=False)
