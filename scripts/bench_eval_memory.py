"""Peak memory of retrieval evaluation (``evaluate_retrieval``) on N images at S pixels.

The evaluation streams its images from disk (embedded batch by batch, decoded again image by
image for re-ranking), so its peak memory above the process's resting size should not grow with
N: it is measured at N/10 and at N images in the same run, and set beside what holding every
image tensor would take, N × 3 × S × S × 4 bytes (COCO 5k at 224 px: 3.0 GB). The model is a
tiny one at S pixels (its size does not change what the images cost); one caption per image,
re-ranking the top ``--k``.

    python scripts/bench_eval_memory.py --images 5000 --size 224 --k 1
"""

from __future__ import annotations

import argparse
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
import psutil
import torch
from PIL import Image

from absvl.data.captions import CaptionedImage
from absvl.evaluation.retrieval import evaluate_retrieval
from absvl.models.vl import AbsVLConfig, AbsVLForRetrieval


class PeakRSS:
    """The largest resident set size (MiB) of this process while the block runs, sampled every 5 ms."""

    def __enter__(self) -> PeakRSS:
        self.process, self.peak, self.running = psutil.Process(), 0.0, True
        self.start = self.process.memory_info().rss / 2**20
        self.thread = threading.Thread(target=self._sample, daemon=True)
        self.thread.start()
        return self

    def _sample(self) -> None:
        while self.running:
            self.peak = max(self.peak, self.process.memory_info().rss / 2**20)
            time.sleep(0.005)

    def __exit__(self, *exc: object) -> None:
        self.running = False
        self.thread.join()


def write_images(folder: Path, count: int, size: int) -> list[CaptionedImage]:
    rng = np.random.default_rng(0)
    colours = ("red", "green", "blue", "yellow")
    images = []
    for i in range(count):
        path = folder / f"{i:06d}.jpg"
        Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8)).save(path, quality=80)
        images.append(CaptionedImage(i, path, (f"a {colours[i % 4]} circle number {i % 97}.",), "test"))
    return images


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=5000)
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--k", type=int, default=1, help="candidates re-ranked per query (default 1)")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--text-encoder", default="data/shapes/text_encoder", help="a local tiny text encoder")
    args = parser.parse_args()
    torch.manual_seed(0)
    config = AbsVLConfig(
        backbone="absvit_test_patch8",
        backbone_kwargs={"img_size": args.size},
        image_size=args.size,
        text_encoder=args.text_encoder,
        fusion_hidden_size=32,
        fusion_layers=1,
        fusion_heads=2,
    )
    model = AbsVLForRetrieval(config).eval()
    with tempfile.TemporaryDirectory() as tmp:
        images = write_images(Path(tmp), args.images, args.size)
        for count in (args.images // 10, args.images):
            begin = time.perf_counter()
            with PeakRSS() as rss:
                result = evaluate_retrieval(model, images[:count], rerank_k=args.k, batch_size=args.batch_size)
            held = count * 3 * args.size * args.size * 4 / 2**20
            print(
                f"{result['images']} images at {args.size} px, {result['captions']} captions, re-ranked top-{args.k}: "
                f"{time.perf_counter() - begin:.0f} s, RSS {rss.start:.0f} MiB at the start, peak {rss.peak:.0f} MiB "
                f"(+{rss.peak - rss.start:.0f} MiB); every image tensor held would be {held:.0f} MiB"
            )


if __name__ == "__main__":
    main()
