"""Load test of a running search server (`moco-mm serve`): latency and throughput of text
queries at several numbers of concurrent clients.

    moco-mm bench-serve --url http://127.0.0.1:8000 [--concurrency 1,8] [--requests 200] [-k 10]

For each concurrency C, C threads, each with its own keep-alive HTTP client (httpx), send
`--requests` POST /search {"text", "k"} between them, as fast as answers come back; the
queries cycle through demo-style captions (or `--queries FILE`, one per line). Reports per C
the answered requests (2xx), the others by status, p50 / p99 / mean latency of the answered
ones (ms, client side: connection reuse, JSON, the server's embed + search) and queries per
second (answered requests / wall time). `--warmup` requests go first and are not counted.
A figure is for this machine and index only; compare them within one run. Absolute numbers
are what it measures, so it is never asserted in tests (tests only check it runs).
"""

from __future__ import annotations

import argparse
import json
import math
import random
import sys
import threading
import time
from collections import Counter
from pathlib import Path

SIZES = ("small", "large")
COLOURS = ("red", "green", "blue", "yellow", "orange", "purple")
SHAPES = ("circle", "square", "star", "cross", "diamond", "triangle")
RELATIONS = ("above", "below", "left of", "right of")


def demo_queries(n: int = 64, seed: int = 0) -> list[str]:
    """Captions in the demo set's style ("a large red circle above a small blue square")."""
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        a = f"a {rng.choice(SIZES)} {rng.choice(COLOURS)} {rng.choice(SHAPES)}"
        b = f"a {rng.choice(SIZES)} {rng.choice(COLOURS)} {rng.choice(SHAPES)}"
        out.append(f"{a} {rng.choice(RELATIONS)} {b}")
    return out


def percentile(sorted_values: list[float], q: float) -> float:
    """Nearest-rank percentile of an ascending list (q in [0, 100])."""
    if not sorted_values:
        return float("nan")
    i = max(0, min(len(sorted_values) - 1, math.ceil(q / 100 * len(sorted_values)) - 1))
    return sorted_values[i]


def run_level(url: str, queries: list[str], concurrency: int, requests: int, k: int, timeout: float) -> dict:
    import httpx

    lock = threading.Lock()
    next_i = 0
    latencies: list[float] = []
    statuses: Counter = Counter()

    def worker() -> None:
        nonlocal next_i
        with httpx.Client(base_url=url, timeout=timeout) as client:
            while True:
                with lock:
                    if next_i >= requests:
                        return
                    i = next_i
                    next_i += 1
                t0 = time.perf_counter()
                try:
                    r = client.post("/search", json={"text": queries[i % len(queries)], "k": k})
                    status = str(r.status_code)
                except httpx.HTTPError as e:
                    status = type(e).__name__
                dt = time.perf_counter() - t0
                with lock:
                    statuses[status] += 1
                    if status.startswith("2"):
                        latencies.append(dt)

    threads = [threading.Thread(target=worker, daemon=True) for _ in range(concurrency)]
    t0 = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - t0
    lat = sorted(latencies)
    ok = len(lat)
    return {"concurrency": concurrency, "requests": requests, "ok": ok,
            "errors": {s: n for s, n in sorted(statuses.items()) if not s.startswith("2")},
            "p50_ms": 1e3 * percentile(lat, 50), "p99_ms": 1e3 * percentile(lat, 99),
            "mean_ms": 1e3 * sum(lat) / ok if ok else float("nan"), "qps": ok / wall if wall > 0 else 0.0,
            "wall_s": wall}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="moco-mm bench-serve", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--url", default="http://127.0.0.1:8000", help="the server (moco-mm serve)")
    ap.add_argument("--concurrency", default="1,8", help="comma-separated numbers of concurrent clients")
    ap.add_argument("--requests", type=int, default=200, help="requests per concurrency level")
    ap.add_argument("-k", type=int, default=10, help="results per query")
    ap.add_argument("--warmup", type=int, default=10, help="uncounted requests first")
    ap.add_argument("--queries", default=None, help="a text file, one query per line (default: demo captions)")
    ap.add_argument("--timeout", type=float, default=30.0, help="seconds per request")
    ap.add_argument("--json", default=None, help="also write the figures here")
    args = ap.parse_args(argv)
    try:
        levels = [int(x) for x in args.concurrency.split(",") if x.strip()]
    except ValueError:
        ap.error(f"--concurrency {args.concurrency!r}: comma-separated integers")
    if not levels or min(levels) < 1 or args.requests < 1 or args.warmup < 0:
        ap.error("--concurrency levels and --requests must be >= 1, --warmup >= 0")
    if args.queries:
        queries = [ln.strip() for ln in Path(args.queries).read_text(encoding="utf-8").splitlines() if ln.strip()]
        if not queries:
            ap.error(f"--queries {args.queries}: no query in it")
    else:
        queries = demo_queries()
    import httpx

    url = args.url.rstrip("/")
    try:
        health = httpx.get(f"{url}/healthz", timeout=args.timeout).json()
    except (httpx.HTTPError, ValueError) as e:
        print(f"bench-serve: error: {url}/healthz: {e}", file=sys.stderr)
        return 2
    print(f"{url}: index {health.get('name')} {health.get('size')}, model {health.get('model_fingerprint')}, "
          f"server limits: {health.get('limits', {}).get('max_concurrent')} running + "
          f"{health.get('limits', {}).get('max_queue')} queued")
    if args.warmup:
        run_level(url, queries, 1, args.warmup, args.k, args.timeout)
    rows = [run_level(url, queries, c, args.requests, args.k, args.timeout) for c in levels]
    print(f"{'clients':>7} {'requests':>8} {'ok':>6} {'p50 ms':>8} {'p99 ms':>8} {'mean ms':>8} {'q/s':>8}  errors")
    for r in rows:
        errors = ", ".join(f"{s}: {n}" for s, n in r["errors"].items()) or "-"
        print(f"{r['concurrency']:>7} {r['requests']:>8} {r['ok']:>6} {r['p50_ms']:>8.1f} {r['p99_ms']:>8.1f} "
              f"{r['mean_ms']:>8.1f} {r['qps']:>8.1f}  {errors}")
    if args.json:
        Path(args.json).write_text(json.dumps({"url": url, "health": health, "k": args.k, "levels": rows},
                                              indent=1), encoding="utf-8")
    return 0 if all(r["ok"] for r in rows) else 1
