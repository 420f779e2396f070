#!/usr/bin/env python3
"""Load test of `kvc serve`: throughput and latency percentiles against batch size and
schedule (slot refill vs batch at a time), on one mixed-length workload.

For every (batch, schedule) it starts `kvc serve` on a free loopback port, sends the same
REQUESTS streamed completions from CONCURRENCY client threads (each sends its next request
as soon as the previous one ends), and reports: wall time, generated tokens per second over
the whole run, request latency and time to first token (p50/p90/p99), and the batch's
occupancy from /metrics (busy row-steps / (steps x batch)). Bounded: REQUESTS requests per
configuration and --time-limit seconds, after which the remaining requests are not sent and
the row says so. Python standard library only.

Usage:
  cargo build --release
  python3 bench/serve_load.py --kvc target/release/kvc --batches 1,4,8 --schedules refill,batch
"""
import argparse
import http.client
import json
import os
import re
import subprocess
import sys
import threading
import time

PROMPTS = [
    "1, 2, 3,",
    "The capital of France is",
    "Once upon a time",
    "def fibonacci(n):",
    "A list of fruits: apple,",
    "The three primary colors are",
]
# Mixed lengths: short and long requests interleaved, so that rows finish at different
# steps (what batch-at-a-time wastes and refill recovers).
MAX_TOKENS = [16, 128, 32, 96, 8, 64, 24, 112]


def workload(n):
    return [
        {
            "prompt": PROMPTS[i % len(PROMPTS)],
            "max_tokens": MAX_TOKENS[i % len(MAX_TOKENS)],
            "temperature": 0,
            "stream": True,
            "stream_options": {"include_usage": True},
        }
        for i in range(n)
    ]


def start_server(args, batch, schedule):
    cmd = [
        args.kvc, "serve", args.model, "--port", "0", "--batch", str(batch),
        "--schedule", schedule, "--cache-len", str(args.cache_len), "--queue", "1024",
    ]
    if args.prefill_len:
        cmd += ["--prefill-len", str(args.prefill_len)]
    proc = subprocess.Popen(cmd, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 600
    for line in proc.stderr:
        m = re.match(r"listening on http://(\S+)", line)
        if m:
            threading.Thread(target=lambda: [None for _ in proc.stderr], daemon=True).start()
            host, port = m.group(1).rsplit(":", 1)
            return proc, host, int(port)
        if time.time() > deadline:
            break
    proc.kill()
    sys.exit(f"kvc serve did not start: {' '.join(cmd)}")


def one_request(host, port, body):
    """Streams one completion; returns (latency s, time to first token s, tokens)."""
    t0 = time.perf_counter()
    conn = http.client.HTTPConnection(host, port, timeout=600)
    conn.request("POST", "/v1/completions", json.dumps(body), {"Content-Type": "application/json"})
    resp = conn.getresponse()
    if resp.status != 200:
        raise RuntimeError(f"HTTP {resp.status}: {resp.read()[:200]!r}")
    first, tokens = None, 0
    for raw in resp:
        line = raw.decode().strip()
        if not line.startswith("data: ") or line == "data: [DONE]":
            continue
        event = json.loads(line[6:])
        if first is None and event["choices"] and event["choices"][0].get("text"):
            first = time.perf_counter() - t0
        if event.get("usage"):
            tokens = event["usage"]["completion_tokens"]
    conn.close()
    latency = time.perf_counter() - t0
    return latency, first if first is not None else latency, tokens


def metrics(host, port):
    conn = http.client.HTTPConnection(host, port, timeout=60)
    conn.request("GET", "/metrics")
    text = conn.getresponse().read().decode()
    conn.close()
    return {l.split()[0]: float(l.split()[1]) for l in text.splitlines() if l and not l.startswith("#")}


def pct(xs, p):
    xs = sorted(xs)
    if not xs:
        return float("nan")
    k = min(len(xs) - 1, max(0, round(p / 100 * (len(xs) - 1))))
    return xs[k]


def run_config(args, batch, schedule):
    proc, host, port = start_server(args, batch, schedule)
    try:
        one_request(host, port, workload(1)[0])  # warm-up: first-touch of the weights
        before = metrics(host, port)
        jobs = workload(args.requests)
        lock = threading.Lock()
        results, errors = [], []
        deadline = time.time() + args.time_limit
        t0 = time.perf_counter()

        def client():
            while True:
                with lock:
                    if not jobs or time.time() > deadline:
                        return
                    body = jobs.pop(0)
                try:
                    r = one_request(host, port, body)
                    with lock:
                        results.append(r)
                except Exception as e:  # noqa: BLE001 - reported in the row
                    with lock:
                        errors.append(str(e))

        threads = [threading.Thread(target=client) for _ in range(args.concurrency)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        wall = time.perf_counter() - t0
        after = metrics(host, port)
    finally:
        proc.terminate()
        proc.wait()
    steps = after["kvc_decode_steps_total"] - before["kvc_decode_steps_total"]
    busy = after["kvc_busy_row_steps_total"] - before["kvc_busy_row_steps_total"]
    lat = [r[0] for r in results]
    ttft = [r[1] for r in results]
    tokens = sum(r[2] for r in results)
    return {
        "batch": batch,
        "schedule": schedule,
        "requests": len(results),
        "unsent": args.requests - len(results) - len(errors),
        "errors": errors[:3],
        "wall_s": wall,
        "tokens": tokens,
        "tokens_per_s": tokens / wall,
        "latency_s": [pct(lat, 50), pct(lat, 90), pct(lat, 99)],
        "ttft_s": [pct(ttft, 50), pct(ttft, 90), pct(ttft, 99)],
        "occupancy": busy / max(1.0, steps * batch),
        "steps": steps,
    }


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--kvc", default="target/release/kvc")
    ap.add_argument("--model", default="models/smollm2-135m.ron")
    ap.add_argument("--batches", default="1,4,8")
    ap.add_argument("--schedules", default="refill,batch")
    ap.add_argument("--requests", type=int, default=48)
    ap.add_argument("--concurrency", type=int, default=16)
    ap.add_argument("--cache-len", type=int, default=256)
    ap.add_argument("--prefill-len", type=int, help="prefill width T (default: the spec's)")
    ap.add_argument("--time-limit", type=float, default=300.0)
    ap.add_argument("--json", help="also write the rows to this file")
    args = ap.parse_args()
    if not os.path.exists(args.kvc):
        sys.exit(f"{args.kvc} not found (cargo build --release)")
    rows = []
    print(f"{args.requests} streamed completions, {args.concurrency} clients, max_tokens cycling "
          f"{MAX_TOKENS}, greedy; model {args.model}")
    print("| batch | schedule | requests | wall s | tokens | tok/s | latency p50/p90/p99 s | TTFT p50/p90/p99 s | occupancy |")
    print("|---:|---|---:|---:|---:|---:|---|---|---:|")
    for b in [int(x) for x in args.batches.split(",")]:
        for sched in args.schedules.split(","):
            if b == 1 and sched != args.schedules.split(",")[0]:
                continue  # one row: the schedules are the same at batch 1
            r = run_config(args, b, sched)
            rows.append(r)
            note = f" ({r['unsent']} unsent, {len(r['errors'])} errors)" if r["unsent"] or r["errors"] else ""
            print(f"| {b} | {sched} | {r['requests']}{note} | {r['wall_s']:.1f} | {r['tokens']} | "
                  f"{r['tokens_per_s']:.1f} | {'/'.join(f'{x:.2f}' for x in r['latency_s'])} | "
                  f"{'/'.join(f'{x:.2f}' for x in r['ttft_s'])} | {r['occupancy']:.2f} |", flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)


if __name__ == "__main__":
    main()
