#!/usr/bin/env python3
"""Load test of `kvc serve`, and of llama.cpp's `llama-server` under the same load: throughput,
time to first token, inter-token latency and request latency percentiles.

For every server and batch size it starts the server on a free loopback port (kvc serve with
`--batch B`; llama-server with `-np B` slots of the same context on the same GGUF file and
thread count), sends the same REQUESTS streamed completions from CONCURRENCY client threads
(each sends its next request as soon as the previous one ends), and reports: wall time,
generated tokens per second over the whole run, request latency, time to first token and
the gap between streamed tokens (p50/p99), and for kvc the batch's occupancy from /metrics
(busy row-steps / (steps x batch)) and the prefill time. Bounded: REQUESTS requests per
configuration and --time-limit seconds, after which the remaining requests are not sent and
the row says so. Python standard library only.

Workloads: `mixed` (default) sends prompts of 60-600 tokens of deterministic word-salad text
(no two alike) with max_tokens cycling 16-192, greedy; `short` the 5-9-token prompts of the
earlier measurements with max_tokens 8-128; `chat` runs conversations of --turns turns, each
turn's prompt the previous prompt, its completion and a new user line (what prompt reuse
saves: compare kvc serve with --kvc-args=--no-prompt-reuse).

Usage:
  cargo build --release && bench/build_llamacpp.sh
  python3 bench/serve_load.py --servers kvc,llama --batches 4,8,16 --cache-len 1024
"""
import argparse
import http.client
import json
import os
import re
import socket
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
MIXED_MAX_TOKENS = [16, 192, 48, 128, 24, 96, 64, 160]
WORDS = (
    "the of and to in is was for on that with as by at from his her it an were which are "
    "this be had not but they have one their all has been who its more first new would "
    "two when there after time into other also some city year made between over could "
    "river music people during world school only most under water house system north "
    "small light village power family early color garden market story winter morning "
    "history paper engine island letter summer bridge number station library mountain"
).split()


def mixed_prompt(i):
    """Prompt `i` of the mixed workload: about 60-600 tokens of deterministic text."""
    words = 45 + (i * 137) % 400  # ~1.3 tokens per word
    x = i * 2654435761 % 2**32 or 1
    out = []
    for _ in range(words):
        x ^= (x << 13) % 2**32
        x ^= x >> 17
        x ^= (x << 5) % 2**32
        out.append(WORDS[x % len(WORDS)])
    return " ".join(out) + "."


CHAT_BODY = {"max_tokens": 48, "temperature": 0, "stream": True,
             "stream_options": {"include_usage": True}}


def chats(requests, turns):
    """Conversations of `turns` turns (requests / turns of them): a 100-400-token opening,
    then each turn adds the answer and a short user line."""
    out = []
    for c in range(max(1, requests // turns)):
        opening = mixed_prompt(3 * c + 1)
        lines = [f"\nUser: and then {mixed_prompt(7 * c + t)[:60]}?\nAssistant:" for t in range(turns)]
        out.append((opening + lines[0], lines[1:] + [""]))
    return out


def workload(n, kind="short"):
    if kind == "mixed":
        prompts = [mixed_prompt(i) for i in range(n)]
        limits = MIXED_MAX_TOKENS
    else:
        prompts = [PROMPTS[i % len(PROMPTS)] for i in range(n)]
        limits = MAX_TOKENS
    return [
        {
            "prompt": prompts[i],
            "max_tokens": limits[i % len(limits)],
            "temperature": 0,
            "stream": True,
            "stream_options": {"include_usage": True},
        }
        for i in range(n)
    ]


def start_server(args, batch, schedule):
    if args.server_kind == "llama":
        return start_llama(args, batch)
    cmd = [
        args.kvc, "serve", args.model, "--port", "0", "--batch", str(batch),
        "--schedule", schedule, "--cache-len", str(args.cache_len), "--queue", "1024",
    ]
    if args.prefill_len:
        cmd += ["--prefill-len", str(args.prefill_len)]
    cmd += args.kvc_args.split()
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


def free_port():
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def gguf_of(args):
    """The GGUF file kvc uses for the spec (fetched through kvc itself)."""
    out = subprocess.run([args.kvc, "run", args.model, "--prompt", "warm up",
                          "--max-new-tokens", "1"], capture_output=True, text=True)
    for line in out.stderr.splitlines():
        if line.startswith("weights: "):
            return line[len("weights: "):].strip()
    sys.exit(f"kvc run {args.model} named no weights file")


def start_llama(args, batch):
    """llama-server with `batch` slots of --cache-len tokens on kvc's GGUF file."""
    port = free_port()
    cmd = [
        args.llama_server, "-m", args.gguf, "--host", "127.0.0.1", "--port", str(port),
        "-np", str(batch), "-c", str(batch * args.cache_len), "-t", str(args.threads),
        "-tb", str(args.threads),
    ]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 300
    while time.time() < deadline:
        try:
            conn = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
            conn.request("GET", "/health")
            if conn.getresponse().status == 200:
                return proc, "127.0.0.1", port
        except OSError:
            pass
        time.sleep(0.5)
    proc.kill()
    sys.exit(f"llama-server did not start: {' '.join(cmd)}")


def one_request(host, port, body):
    """Streams one completion; returns (latency s, time to first token s, tokens, gaps s,
    text)."""
    t0 = time.perf_counter()
    conn = http.client.HTTPConnection(host, port, timeout=600)
    conn.request("POST", "/v1/completions", json.dumps(body), {"Content-Type": "application/json"})
    resp = conn.getresponse()
    if resp.status != 200:
        raise RuntimeError(f"HTTP {resp.status}: {resp.read()[:200]!r}")
    first, tokens, chunks, last, gaps, text = None, 0, 0, None, [], []
    for raw in resp:
        line = raw.decode().strip()
        if not line.startswith("data: ") or line == "data: [DONE]":
            continue
        event = json.loads(line[6:])
        if event.get("choices") and event["choices"][0].get("text"):
            text.append(event["choices"][0]["text"])
            now = time.perf_counter()
            chunks += 1
            if first is None:
                first = now - t0
            else:
                gaps.append(now - last)
            last = now
        if event.get("usage"):
            tokens = event["usage"]["completion_tokens"]
    conn.close()
    latency = time.perf_counter() - t0
    return latency, first if first is not None else latency, tokens or chunks, gaps, "".join(text)


def metrics(args, host, port):
    if args.server_kind != "kvc":
        return {}
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
        before = metrics(args, host, port)
        chat = args.workload == "chat"
        jobs = chats(args.requests, args.turns) if chat else workload(args.requests, args.workload)
        lock = threading.Lock()
        results, errors = [], []
        deadline = time.time() + args.time_limit
        t0 = time.perf_counter()

        def client():
            while True:
                with lock:
                    if not jobs or time.time() > deadline:
                        return
                    job = jobs.pop(0)
                try:
                    if not chat:
                        r = one_request(host, port, job)
                        with lock:
                            results.append(r)
                        continue
                    # A conversation: each turn's prompt is the last one, its answer and
                    # a new user line.
                    prompt, turns = job
                    for turn in turns:
                        body = dict(CHAT_BODY, prompt=prompt)
                        r = one_request(host, port, body)
                        with lock:
                            results.append(r)
                        prompt = prompt + r[4] + turn
                except Exception as e:  # noqa: BLE001 - reported in the row
                    with lock:
                        errors.append(str(e))

        threads = [threading.Thread(target=client) for _ in range(args.concurrency)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        wall = time.perf_counter() - t0
        after = metrics(args, host, port)
    finally:
        proc.terminate()
        proc.wait()
    delta = lambda k: after.get(k, 0.0) - before.get(k, 0.0)  # noqa: E731
    steps = delta("kvc_decode_steps_total")
    busy = delta("kvc_busy_row_steps_total")
    lat = [r[0] for r in results]
    ttft = [r[1] for r in results]
    tokens = sum(r[2] for r in results)
    gaps = [g for r in results for g in r[3]]
    return {
        "server": args.server_kind,
        "batch": batch,
        "schedule": schedule if args.server_kind == "kvc" else "-",
        "requests": len(results),
        "unsent": args.requests - len(results) - len(errors),
        "errors": errors[:3],
        "wall_s": wall,
        "tokens": tokens,
        "tokens_per_s": tokens / wall,
        "latency_s": [pct(lat, 50), pct(lat, 90), pct(lat, 99)],
        "ttft_s": [pct(ttft, 50), pct(ttft, 90), pct(ttft, 99)],
        "itl_s": [pct(gaps, 50), pct(gaps, 90), pct(gaps, 99)],
        "occupancy": busy / max(1.0, steps * batch) if args.server_kind == "kvc" else None,
        "steps": steps,
        "prefill_s": delta("kvc_refill_seconds_total"),
        "prompt_tokens_reused": delta("kvc_prompt_tokens_reused_total"),
    }


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--kvc", default="target/release/kvc")
    ap.add_argument("--model", default="models/smollm2-135m.ron")
    ap.add_argument("--servers", default="kvc", help="kvc, llama or both (kvc,llama)")
    ap.add_argument("--llama-server", default="bench/llama.cpp/bin/llama-server")
    ap.add_argument("--threads", type=int, default=int(os.environ.get("RAYON_NUM_THREADS", os.cpu_count())))
    ap.add_argument("--batches", default="1,4,8")
    ap.add_argument("--schedules", default="refill,batch")
    ap.add_argument("--workload", choices=["mixed", "short", "chat"], default="mixed")
    ap.add_argument("--turns", type=int, default=4, help="turns per conversation (--workload chat)")
    ap.add_argument("--kvc-args", default="", help="more `kvc serve` arguments, e.g. --no-prompt-reuse")
    ap.add_argument("--requests", type=int, default=48)
    ap.add_argument("--concurrency", type=int, default=16)
    ap.add_argument("--cache-len", type=int, default=1024)
    ap.add_argument("--prefill-len", type=int, help="kvc's prefill width T (default: kvc serve's)")
    ap.add_argument("--time-limit", type=float, default=300.0)
    ap.add_argument("--json", help="also write the rows to this file")
    args = ap.parse_args()
    if not os.path.exists(args.kvc):
        sys.exit(f"{args.kvc} not found (cargo build --release)")
    servers = args.servers.split(",")
    if "llama" in servers:
        if not os.path.exists(args.llama_server):
            sys.exit(f"{args.llama_server} not found (bench/build_llamacpp.sh)")
        args.gguf = gguf_of(args)
    os.environ["RAYON_NUM_THREADS"] = str(args.threads)
    flags = sorted(set(re.findall(r"\b(avx512\w*|avx2|fma|f16c|amx\w*)\b", open("/proc/cpuinfo").read())))
    rows = []
    print(f"{args.requests} streamed completions ({args.workload} workload), {args.concurrency} "
          f"clients, greedy; model {args.model}; {args.threads} threads; slots of "
          f"{args.cache_len} tokens; flags {' '.join(flags)}")
    print("| server | batch | schedule | requests | wall s | tokens | tok/s | TTFT p50/p99 s | "
          "inter-token p50/p99 s | latency p50/p99 s | occupancy | prefill s | prompt tokens reused |")
    print("|---|---:|---|---:|---:|---:|---:|---|---|---|---:|---:|---:|")
    for server in servers:
        args.server_kind = server
        for b in [int(x) for x in args.batches.split(",")]:
            schedules = args.schedules.split(",") if server == "kvc" else ["-"]
            for sched in schedules:
                if b == 1 and sched != schedules[0]:
                    continue  # one row: the schedules are the same at batch 1
                r = run_config(args, b, sched)
                rows.append(r)
                note = f" ({r['unsent']} unsent, {len(r['errors'])} errors)" if r["unsent"] or r["errors"] else ""
                two = lambda xs: f"{xs[0]:.2f}/{xs[2]:.2f}"  # noqa: E731
                occ = f"{r['occupancy']:.2f}" if r["occupancy"] is not None else "-"
                pre = f"{r['prefill_s']:.1f}" if server == "kvc" else "-"
                print(f"| {server} | {b} | {r['schedule']} | {r['requests']}{note} | {r['wall_s']:.1f} | "
                      f"{r['tokens']} | {r['tokens_per_s']:.1f} | {two(r['ttft_s'])} | {two(r['itl_s'])} | "
                      f"{two(r['latency_s'])} | {occ} | {pre} | {r['prompt_tokens_reused']:.0f} |", flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)


if __name__ == "__main__":
    main()
