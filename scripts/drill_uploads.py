#!/usr/bin/env python
"""Upload drill: many concurrent large 16-bit PNG ``/vqa`` uploads against ``absvl serve``; peak memory vs idle.

The server runs in a child process (``python -m absvl.cli serve``), so the client's copies of the
uploads are not counted. Memory is the server's resident set: ``VmRSS`` at idle and the kernel's
high-water mark ``VmHWM`` (from ``/proc/PID/status``, reset with ``/proc/PID/clear_refs`` after
start-up), so the drill runs on Linux only. Three phases, each after a reset of the high-water mark:

1. **idle**: after start-up and one small warm-up upload;
2. **one at a time**: ``SEQUENTIAL`` large uploads, one after the other (one decode's working set:
   the bytes, the decoded pixels and their conversion to 8-bit RGB, plus the allocator's slack
   after a few of them);
3. **burst**: ``--uploads`` of the same image at once.

The service decodes uploads on its one model thread only, and an upload being received or waiting
stays in Starlette's spooled temporary file (in memory up to 1 MiB, on disk beyond), so the stated
bound is one decode plus a small constant per upload in flight, whatever the image size:

    peak(burst) <= peak(one at a time) + uploads x PER_UPLOAD,   PER_UPLOAD = 4 MiB

(1 MiB of spool, the rest for the connection's buffers, the multipart parser and the pool thread
that writes the spool file; 2.2 MiB measured with 40 uploads of 25 MP). Uploads past ``max_pending`` are
answered 503 with ``Retry-After``; uploads that wait longer than the request timeout get 504.

    python scripts/drill_uploads.py --model runs/shapes_absvit_tiny/final            # 40 x 25 MP, 16-bit
    python scripts/drill_uploads.py --model DIR --uploads 8 --side 2000 --max-pending 4
"""

from __future__ import annotations

import argparse
import io
import json
import socket
import subprocess
import sys
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

MIB = 1024 * 1024
PER_UPLOAD = 4 * MIB  # see the module docstring
SEQUENTIAL = 3


def sixteen_bit_png(side: int, seed: int = 0) -> bytes:
    """A ``side``² 16-bit grayscale PNG: a diagonal ramp with 2 bits of noise (25 MP: about 7 MB)."""
    y, x = np.mgrid[0:side, 0:side]
    noise = np.random.default_rng(seed).integers(0, 3, (side, side), dtype=np.uint16)
    pixels = ((x * 13 + y * 7) % 65536).astype(np.uint16) | noise
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG")
    return buffer.getvalue()


def memory(pid: int) -> dict[str, int]:
    """``VmRSS`` and ``VmHWM`` (peak) of process ``pid`` in bytes."""
    fields = dict(line.split(":", 1) for line in Path(f"/proc/{pid}/status").read_text().splitlines() if ":" in line)
    return {name: int(fields[name].split()[0]) * 1024 for name in ("VmRSS", "VmHWM")}


def reset_peak(pid: int) -> None:
    """Set the high-water mark of ``pid`` to its current resident set (Linux ≥ 4.0)."""
    Path(f"/proc/{pid}/clear_refs").write_text("5")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(model: Path, port: int, extra: list[str]) -> subprocess.Popen:
    """``absvl serve`` in a child process, returned once ``/health`` answers."""
    import httpx

    command = [
        sys.executable,
        "-m",
        "absvl.cli",
        "serve",
        "--model",
        str(model),
        "--port",
        str(port),
        "--log-level",
        "warning",
        *extra,
    ]
    server = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        if server.poll() is not None:
            raise RuntimeError(f"the server exited with {server.returncode}: {server.stderr.read()[-2000:]}")
        try:
            if httpx.get(f"http://127.0.0.1:{port}/health", timeout=1).status_code == 200:
                return server
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    server.kill()
    raise RuntimeError("the server did not answer /health within 120 s")


def upload_all(url: str, image: bytes, count: int) -> list[tuple[int, str | None]]:
    """``count`` simultaneous ``/vqa`` uploads of ``image``: (status, Retry-After) of each."""
    import httpx

    def one(client: httpx.Client) -> tuple[int, str | None]:
        response = client.post(
            "/vqa",
            files={"image": ("drill.png", image, "image/png")},
            data={"question": "what is in the picture?", "top_k": "1"},
        )
        return response.status_code, response.headers.get("retry-after")

    limits = httpx.Limits(max_connections=count, max_keepalive_connections=count)
    with httpx.Client(base_url=url, timeout=900, limits=limits) as client, ThreadPoolExecutor(count) as pool:
        return list(pool.map(lambda _: one(client), range(count)))


def run_drill(model: Path, uploads: int = 40, side: int = 5000, server_args: tuple[str, ...] = ()) -> dict[str, Any]:
    """The three phases against a fresh server; memory in MiB."""
    if not Path("/proc/self/clear_refs").exists():
        raise SystemExit("drill_uploads needs Linux (/proc/PID/status and clear_refs)")
    image = sixteen_bit_png(side)
    port = _free_port()
    url = f"http://127.0.0.1:{port}"
    server = start_server(model, port, list(server_args))
    try:
        upload_all(url, sixteen_bit_png(64), 1)  # warm-up: first model call, lazy imports
        idle = memory(server.pid)["VmRSS"]
        reset_peak(server.pid)
        one = [upload_all(url, image, 1)[0] for _ in range(SEQUENTIAL)]
        peak_one = memory(server.pid)["VmHWM"]
        reset_peak(server.pid)
        start = time.perf_counter()
        burst = upload_all(url, image, uploads)
        seconds = time.perf_counter() - start
        peak_burst = memory(server.pid)["VmHWM"]
    finally:
        server.terminate()
        server.wait(timeout=30)
    bound = peak_one + uploads * PER_UPLOAD
    return {
        "uploads": uploads,
        "side": side,
        "megapixels": side * side / 1e6,
        "upload_mib": round(len(image) / MIB, 2),
        "one_at_a_time": dict(Counter(status for status, _ in one)),
        "statuses": dict(Counter(status for status, _ in burst)),
        "retry_after": sorted({after for status, after in burst if status == 503 and after}),
        "burst_seconds": round(seconds, 1),
        "idle_rss_mib": round(idle / MIB, 1),
        "peak_one_at_a_time_mib": round(peak_one / MIB, 1),
        "peak_burst_mib": round(peak_burst / MIB, 1),
        "bound_mib": round(bound / MIB, 1),
        "within_bound": peak_burst <= bound,
    }


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path, required=True, help="a save_pretrained folder (absvl serve --model)")
    parser.add_argument("--uploads", type=int, default=40, help="simultaneous uploads (default 40)")
    parser.add_argument("--side", type=int, default=5000, help="image side in pixels (default 5000: 25 MP)")
    parser.add_argument("--max-pending", help="the server's --max-pending (default: its own)")
    parser.add_argument("--request-timeout", help="the server's --request-timeout (default: its own)")
    args = parser.parse_args(argv)
    if args.uploads < 1 or args.side < 1:
        parser.error("--uploads and --side must be positive")
    server_args = [
        item
        for flag in ("max_pending", "request_timeout")
        if getattr(args, flag)
        for item in (f"--{flag.replace('_', '-')}", getattr(args, flag))
    ]
    report = run_drill(args.model, args.uploads, args.side, tuple(server_args))
    print(json.dumps(report, indent=2))
    return report


if __name__ == "__main__":
    main()
