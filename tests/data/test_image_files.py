"""absvl.data.image_files: image files as model inputs by position, unreadable ones set aside."""

import numpy as np
import torch
from PIL import Image

from absvl.data.image_files import ImageFiles, collate_image_files
from absvl.models.vl.processing import preprocess_image


def test_image_files_match_preprocess_image_and_set_bad_files_aside(tmp_path):
    good = tmp_path / "good.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (20, 30, 3), dtype=np.uint8)).save(good)
    bad = tmp_path / "bad.jpg"
    bad.write_bytes(b"not an image")
    files = ImageFiles([bad, good, tmp_path / "missing.jpg"], image_size=16)
    positions, images, skipped = collate_image_files([files[i] for i in range(len(files))])
    assert positions == [1] and images.shape == (1, 3, 16, 16)
    assert [pos for pos, _ in skipped] == [0, 2] and "file not found" in skipped[1][1]
    # the same inputs the pipelines and search build (the index and queries must agree)
    assert torch.equal(images[0], preprocess_image(good, 16))
    assert collate_image_files([files[0]])[1] is None
