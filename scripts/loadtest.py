"""A bounded load test of `freesegdiff serve` on loopback; it prints its figures and stops by itself.

It starts the server (tiny random-weight models, a small queue) and an image host, then
sends /predict calls in waves of four times the queue's capacity, all at once, while
another thread polls /health and the server's resident memory is sampled after every
wave. What it measures is the server's mechanics under overload: the queue answering 503
with Retry-After, /health staying fast, memory staying flat. It is not a speed benchmark
(see `freesegdiff bench`): after the first request the image's features come from the
feature cache, and refinement is off, so each accepted call costs K-means, CLIP on the
clusters (on a 16x16 feature grid) and the brush RLE.

    .venv/bin/python scripts/loadtest.py                    # 1,000 requests
    .venv/bin/python scripts/loadtest.py --requests 150 --json out.json
"""

from __future__ import annotations

import argparse
import io
import json
import os
import re
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import requests
from PIL import Image
from sklearn.datasets import load_sample_image

CONFIG = """<View>
  <Image name="image" value="$image"/>
  <BrushLabels name="tag" toName="image" model_k="3" model_refine="none">
    <Label value="building"/><Label value="tree"/><Label value="sky"/>
  </BrushLabels>
</View>"""
# The feature grid of FREESEG_FEATURE_GRID=16 makes K-means 16 times cheaper than the default 32: the
# test measures the server's mechanics, not the models, and must stay short on 2 CPU cores.
FEATURE_GRID = 16
HEALTH_EVERY_SECONDS = 0.05


@dataclass(frozen=True)
class LoadConfig:
    requests: int = 1000
    queue_size: int = 4
    warmup_requests: int = 100  # memory is compared from here on: allocators and caches settle first
    model_dir: str | None = None  # MODEL_DIR for the tiny models; None: the server's default
    max_seconds: float = 900


@dataclass(frozen=True)
class Outcome:
    status: int
    retry_after: str | None


@dataclass
class Report:
    measured: str
    queue_size: int
    concurrency: int
    requests: int
    seconds: float
    statuses: dict[str, int]
    ok: int
    busy: int
    busy_with_retry_after: int
    other: int
    health_checks: int
    health_p50_ms: float
    health_p99_ms: float
    health_max_ms: float
    health_failures: int
    rss_start_mib: float
    rss_after_warmup_mib: float
    rss_end_mib: float
    rss_growth_after_warmup_mib: float
    rss_slope_mib_per_100_requests: float
    cache_hits: int
    cache_misses: int
    rss_samples: list[tuple[int, float]]  # (requests done, RSS MiB) after each wave


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def photo_jpeg() -> bytes:
    """scikit-learn's 640x427 photo: a leak of one decoded image per request would add 80 MiB per 100."""
    buffer = io.BytesIO()
    Image.fromarray(load_sample_image("china.jpg")).save(buffer, "JPEG", quality=90)
    return buffer.getvalue()


def serve_image(data: bytes) -> tuple[ThreadingHTTPServer, str]:
    """A loopback HTTP server answering every GET with ``data``; its image URL."""

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            self.send_response(200)
            self.send_header("Content-Type", "image/jpeg")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def log_message(self, *args: object) -> None:
            """Quiet."""

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    server.daemon_threads = True
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server, f"http://127.0.0.1:{server.server_address[1]}/photo.jpg"


def start_backend(port: int, config: LoadConfig, log: io.TextIOBase) -> subprocess.Popen:
    """`freesegdiff serve` with the tiny models and a queue of ``config.queue_size``."""
    env = {**os.environ, "FREESEG_MODELS": "tiny", "FREESEG_DEVICE": "cpu", "HF_HUB_OFFLINE": "1",
           "FREESEG_QUEUE_SIZE": str(config.queue_size), "FREESEG_ALLOW_PRIVATE_URLS": "true",
           "FREESEG_FEATURE_GRID": str(FEATURE_GRID), "LOG_LEVEL": "WARNING"}
    if config.model_dir:
        env["MODEL_DIR"] = config.model_dir
    command = [sys.executable, "-m", "backend.cli", "serve", "--host", "127.0.0.1", "--port", str(port)]
    return subprocess.Popen(command, env=env, stdout=log, stderr=subprocess.STDOUT)


def wait_ready(base: str, process: subprocess.Popen, seconds: float = 180) -> None:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"the server exited with status {process.returncode}")
        try:
            if requests.get(f"{base}/health", timeout=1).json().get("model_state") == "ready":
                return
        except requests.RequestException:
            pass
        time.sleep(0.2)
    raise RuntimeError(f"the server was not ready within {seconds:g} s")


def counter(base: str, name: str) -> int:
    """A counter's value from the server's /metrics."""
    match = re.search(rf"^{name} ([0-9.e+]+)$", requests.get(f"{base}/metrics", timeout=5).text, re.MULTILINE)
    return int(float(match.group(1))) if match else 0


def rss_mib(pid: int) -> float:
    """Resident memory of a process, from /proc (VmRSS is in KiB)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError(f"no VmRSS for process {pid}")


class HealthPoller(threading.Thread):
    """Times GET /health every HEALTH_EVERY_SECONDS until stopped."""

    def __init__(self, base: str):
        super().__init__(daemon=True)
        self.base = base
        self.seconds: list[float] = []
        self.failures = 0
        self.stopped = threading.Event()

    def run(self) -> None:
        with requests.Session() as session:
            while not self.stopped.wait(HEALTH_EVERY_SECONDS):
                started = time.perf_counter()
                try:
                    ok = session.get(f"{self.base}/health", timeout=5).status_code == 200
                except requests.RequestException:
                    ok = False
                self.seconds.append(time.perf_counter() - started)
                self.failures += not ok


def fire_wave(base: str, body: dict, size: int) -> list[Outcome]:
    """``size`` concurrent /predict calls, released together by a barrier."""
    barrier = threading.Barrier(size)

    def call(_: int) -> Outcome:
        barrier.wait()
        response = requests.post(f"{base}/predict", json=body, timeout=120)
        return Outcome(response.status_code, response.headers.get("Retry-After"))

    with ThreadPoolExecutor(size) as pool:
        return list(pool.map(call, range(size)))


def percentile(values: Sequence[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q / 100 * (len(ordered) - 1)))]


def slope(samples: Sequence[tuple[int, float]]) -> float:
    """Least-squares slope of memory over requests (MiB per request)."""
    if len(samples) < 2:
        return 0.0
    return statistics.linear_regression([float(x) for x, _ in samples], [y for _, y in samples]).slope


def run_load(config: LoadConfig) -> Report:
    concurrency = 4 * config.queue_size
    image_server, image_url = serve_image(photo_jpeg())
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    body = {"tasks": [{"id": 1, "data": {"image": image_url}}], "label_config": CONFIG, "project": "1.1"}
    with tempfile.TemporaryFile("w+") as log:
        process = start_backend(port, config, log)
        try:
            wait_ready(base, process)
            return _measure(base, process.pid, body, config, concurrency)
        except Exception:
            log.seek(0)
            sys.stderr.write(log.read()[-4000:])
            raise
        finally:
            process.terminate()
            process.wait(30)
            image_server.shutdown()


def _measure(base: str, pid: int, body: dict, config: LoadConfig, concurrency: int) -> Report:
    rss_start = rss_mib(pid)
    poller = HealthPoller(base)
    poller.start()
    outcomes: list[Outcome] = []
    samples: list[tuple[int, float]] = []  # (requests done, RSS MiB) after each wave
    started = time.monotonic()
    while len(outcomes) < config.requests and time.monotonic() - started < config.max_seconds:
        outcomes += fire_wave(base, body, min(concurrency, config.requests - len(outcomes)))
        samples.append((len(outcomes), rss_mib(pid)))
    seconds = time.monotonic() - started
    poller.stopped.set()
    poller.join()
    cache = (counter(base, "freeseg_feature_cache_hits_total"), counter(base, "freeseg_feature_cache_misses_total"))
    return _report(config, concurrency, outcomes, seconds, poller, rss_start, samples, cache)


def _report(config: LoadConfig, concurrency: int, outcomes: list[Outcome], seconds: float, poller: HealthPoller,
            rss_start: float, samples: list[tuple[int, float]], cache: tuple[int, int]) -> Report:
    statuses = Counter(outcome.status for outcome in outcomes)
    busy = [outcome for outcome in outcomes if outcome.status == 503]
    after_warmup = [(done, rss) for done, rss in samples if done >= config.warmup_requests] or samples[-1:]
    health_ms = [s * 1000 for s in poller.seconds] or [0.0]
    return Report(
        measured=(f"freesegdiff serve, tiny random-weight models on CPU, FREESEG_QUEUE_SIZE={config.queue_size}; "
                  f"FREESEG_FEATURE_GRID={FEATURE_GRID}; {concurrency} concurrent /predict calls per wave, one 640x427 "
                  "JPEG per call fetched over loopback, its features from the feature cache after the first "
                  "calls, K=3, refinement none; /health polled every 50 ms"),
        queue_size=config.queue_size, concurrency=concurrency, requests=len(outcomes), seconds=round(seconds, 1),
        statuses={str(status): count for status, count in sorted(statuses.items())},
        ok=statuses[200], busy=len(busy), busy_with_retry_after=sum(bool(o.retry_after) for o in busy),
        other=len(outcomes) - statuses[200] - len(busy),
        health_checks=len(poller.seconds), health_p50_ms=round(percentile(health_ms, 50), 1),
        health_p99_ms=round(percentile(health_ms, 99), 1), health_max_ms=round(max(health_ms), 1),
        health_failures=poller.failures,
        rss_start_mib=round(rss_start, 1), rss_after_warmup_mib=round(after_warmup[0][1], 1),
        rss_end_mib=round(samples[-1][1], 1),
        rss_growth_after_warmup_mib=round(samples[-1][1] - after_warmup[0][1], 1),
        rss_slope_mib_per_100_requests=round(100 * slope(after_warmup), 2),
        cache_hits=cache[0], cache_misses=cache[1], rss_samples=[(done, round(rss, 1)) for done, rss in samples],
    )


def format_report(report: Report) -> str:
    return "\n".join([
        f"measured: {report.measured}",
        f"requests: {report.requests} in {report.seconds} s (waves of {report.concurrency})",
        (f"  200: {report.ok}   503: {report.busy} ({report.busy_with_retry_after} with Retry-After)   "
         f"other: {report.other}   by status: {report.statuses}"),
        (f"/health: {report.health_checks} checks, p50 {report.health_p50_ms} ms, p99 {report.health_p99_ms} ms, "
         f"max {report.health_max_ms} ms, {report.health_failures} failed"),
        (f"server RSS: start {report.rss_start_mib} MiB, after warm-up {report.rss_after_warmup_mib} MiB, "
         f"end {report.rss_end_mib} MiB; after warm-up: {report.rss_growth_after_warmup_mib:+} MiB, "
         f"slope {report.rss_slope_mib_per_100_requests:+} MiB per 100 requests"),
        f"feature cache: {report.cache_hits} hits, {report.cache_misses} misses",
    ])


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=LoadConfig.requests)
    parser.add_argument("--queue-size", type=int, default=LoadConfig.queue_size)
    parser.add_argument("--warmup", type=int, default=LoadConfig.warmup_requests,
                        help="requests before memory is compared")
    parser.add_argument("--model-dir", help="MODEL_DIR for the tiny models (default: the server's)")
    parser.add_argument("--json", type=Path, help="also write the figures here")
    args = parser.parse_args(argv)
    report = run_load(LoadConfig(requests=args.requests, queue_size=args.queue_size, warmup_requests=args.warmup,
                                 model_dir=args.model_dir))
    print(format_report(report))
    if args.json:
        args.json.write_text(json.dumps(asdict(report), indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
