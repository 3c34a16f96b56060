"""Load test for `scratchlm serve`: N concurrent streaming clients, a fixed number of requests.

Starts the server (a subprocess on 127.0.0.1, nothing else is contacted), then for each
--max-batch setting and each client count sends --requests streaming completions, each
client sending its next request as soon as the last one ends. Prints, per run:

    requests/s    completed requests / wall time
    tokens/s      generated tokens / wall time (from the usage of each stream)
    TTFT p50/p99  time from sending a request to its first token
    errors        failed requests (must be 0)

Comparing --max-batch 1 (one request at a time, first come first served) with the
default 16 (continuous batching) shows what batching buys on this machine.

    python benchmarks/serve_load.py                                 # gpt-small-cpu, random weights
    python benchmarks/serve_load.py --model runs/my-model --clients 1,4,16 --requests 64
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import socket
import statistics
import subprocess
import sys
import time


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(model: str, max_batch: int, threads: int) -> tuple[subprocess.Popen, str]:
    import httpx

    port = free_port()
    env = dict(os.environ, OMP_NUM_THREADS=str(threads))
    proc = subprocess.Popen([sys.executable, "-m", "scratchlm.cli", "serve", model, "--port", str(port),
                             "--max-batch", str(max_batch), "--max-queue", "256", "--log-level", "warning"],
                            env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"the server exited: {proc.stderr.read().decode().strip()[-500:]}")
        try:
            if httpx.get(url + "/health", timeout=1).status_code == 200:
                return proc, url
        except httpx.TransportError:
            time.sleep(0.2)
    proc.kill()
    raise SystemExit("the server did not come up within 120 s")


async def one_request(client, url: str, model: str, prompt: str, max_tokens: int) -> tuple[float, int]:
    """Stream one completion; return (time to first token, tokens generated)."""
    body = {"model": model, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0, "stream": True,
            "stream_options": {"include_usage": True}}
    start = time.perf_counter()
    ttft, tokens = None, None
    async with client.stream("POST", url + "/v1/completions", json=body) as response:
        if response.status_code != 200:
            raise RuntimeError(f"HTTP {response.status_code}: {(await response.aread())[:200]!r}")
        async for line in response.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            if "error" in chunk:
                raise RuntimeError(chunk["error"]["message"])
            if ttft is None and chunk["choices"] and chunk["choices"][0]["text"]:
                ttft = time.perf_counter() - start
            if chunk.get("usage"):
                tokens = chunk["usage"]["completion_tokens"]
    if tokens is None:
        raise RuntimeError("the stream ended without usage")
    return (ttft if ttft is not None else time.perf_counter() - start), tokens


async def run_load(url: str, model: str, clients: int, requests: int, max_tokens: int, deadline: float) -> dict:
    import httpx

    queue: asyncio.Queue = asyncio.Queue()
    for i in range(requests):
        queue.put_nowait(f"Request {i}: the quick brown fox number {i * 7 % 13} jumps over")
    ttfts, tokens, errors = [], 0, []

    async def worker(client):
        nonlocal tokens
        while not queue.empty() and time.monotonic() < deadline:
            prompt = queue.get_nowait()
            try:
                t, n = await asyncio.wait_for(one_request(client, url, model, prompt, max_tokens),
                                              timeout=max(1.0, deadline - time.monotonic()))
                ttfts.append(t)
                tokens += n
            except Exception as e:  # noqa: BLE001 - counted and shown
                errors.append(f"{type(e).__name__}: {e}")

    limits = httpx.Limits(max_connections=clients, max_keepalive_connections=clients)
    async with httpx.AsyncClient(timeout=120, limits=limits) as client:
        start = time.perf_counter()
        await asyncio.gather(*(worker(client) for _ in range(clients)))
        wall = time.perf_counter() - start
    ttfts.sort()
    pick = lambda q: ttfts[min(len(ttfts) - 1, int(q * len(ttfts)))] if ttfts else float("nan")  # noqa: E731
    return {"clients": clients, "done": len(ttfts), "wall_s": wall, "req_per_s": len(ttfts) / wall,
            "tok_per_s": tokens / wall, "ttft_p50_ms": 1000 * statistics.median(ttfts) if ttfts else float("nan"),
            "ttft_p99_ms": 1000 * pick(0.99), "errors": len(errors) + (requests - len(ttfts) - len(errors)),
            "first_error": errors[0] if errors else None}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="gpt-small-cpu", help="model directory or preset (default gpt-small-cpu)")
    p.add_argument("--clients", default="1,4,16", help="comma-separated concurrency levels")
    p.add_argument("--requests", type=int, default=32, help="requests per run")
    p.add_argument("--max-tokens", type=int, default=32, help="tokens per request")
    p.add_argument("--max-batch", default="1,16", help="comma-separated server --max-batch settings to compare")
    p.add_argument("--threads", type=int, default=2, help="torch threads in the server")
    p.add_argument("--time-limit", type=float, default=600, help="stop everything after this many seconds")
    args = p.parse_args()
    started = time.monotonic()
    name = os.path.basename(args.model.rstrip("/"))
    rows = []
    print(f"model {args.model}, {args.requests} requests x {args.max_tokens} tokens per run, "
          f"{args.threads} torch threads, {os.cpu_count()} CPUs")
    print(f"{'max_batch':>9} {'clients':>7} {'req/s':>7} {'tok/s':>8} {'TTFT p50 ms':>11} {'TTFT p99 ms':>11} {'errors':>6}")
    for max_batch in [int(b) for b in args.max_batch.split(",")]:
        proc, url = start_server(args.model, max_batch, args.threads)
        try:
            for clients in [int(c) for c in args.clients.split(",")]:
                deadline = started + args.time_limit
                if time.monotonic() > deadline:
                    print("time limit reached")
                    break
                r = asyncio.run(run_load(url, name, clients, args.requests, args.max_tokens, deadline))
                rows.append({"max_batch": max_batch, **r})
                print(f"{max_batch:>9} {clients:>7} {r['req_per_s']:>7.2f} {r['tok_per_s']:>8.1f} "
                      f"{r['ttft_p50_ms']:>11.1f} {r['ttft_p99_ms']:>11.1f} {r['errors']:>6}", flush=True)
                if r["first_error"]:
                    print(f"          first error: {r['first_error']}")
        finally:
            proc.terminate()
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                proc.kill()
    return 1 if any(r["errors"] for r in rows) else 0


if __name__ == "__main__":
    sys.exit(main())
