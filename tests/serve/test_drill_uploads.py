"""scripts/drill_uploads.py at a small size: simultaneous 16-bit PNG uploads keep the server's peak
memory within the bound, and uploads past the queue get 503 with Retry-After."""

from __future__ import annotations

import io
import runpy
import sys
from pathlib import Path

import pytest
from PIL import Image

DRILL = runpy.run_path(str(Path(__file__).resolve().parents[2] / "scripts" / "drill_uploads.py"))


def test_the_drill_image_is_a_16_bit_png():
    image = Image.open(io.BytesIO(DRILL["sixteen_bit_png"](300)))
    assert image.format == "PNG" and image.mode == "I;16" and image.size == (300, 300)


@pytest.mark.slow
@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="the drill reads /proc (Linux only)")
def test_simultaneous_uploads_stay_within_the_memory_bound(model_dir):
    report = DRILL["main"](["--model", str(model_dir), "--uploads", "8", "--side", "2500", "--max-pending", "4"])
    assert report["one_at_a_time"] == {200: 3}
    assert set(report["statuses"]) <= {200, 503} and report["statuses"][200] >= 4
    if 503 in report["statuses"]:
        assert report["retry_after"] == ["1"]
    one_upload = report["peak_one_at_a_time_mib"] - report["idle_rss_mib"]
    assert one_upload > 50  # 6.25 MP: the decode working set is visible above the noise
    assert report["within_bound"], report
