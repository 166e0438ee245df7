"""Serving load test: `python -m moca.serve` on a loopback port, N concurrent clients against one.

The server runs as its own process (the real CLI, warm-up included) so that the clients' Python
does not share its interpreter. The requests are `bench_embed`'s MMEB-like mix (short texts,
an image with a question, documents with two images), one input per request, images as base64
JPEG. The same requests are sent twice: by N concurrent clients (the server packs whatever waits
into one forward per bin) and by one client, one request at a time (every forward holds one
input). Reported: items/s, latency p50/p99 per request, batch occupancy read from the server's
/metrics (inputs per forward, tokens + patches per forward over the budget, mean forward time and the
share of the wall time the device thread spent in forwards), and the largest
difference between the two runs' vectors (batch invariance: ~1e-6 in fp32, bf16 rounding on GPU).
CPU: the tiny preset; CUDA: the 3b shapes in bf16 (random weights).
"""

import asyncio
import base64
import os
import socket
import subprocess
import sys
import tempfile
import time

import httpx
import numpy as np
from prometheus_client.parser import text_string_to_metric_families

from bench_embed import make_items

BATCH_TOKENS = 16384


def _setup(device: str, quick: bool) -> tuple[str, int, int, tuple[int, int]]:
    """-> (model, requests, concurrent clients, tokens-per-image range of the JPEGs)."""
    if device == "cuda":
        return "3b", (256 if quick else 1024), 32, (256, 1024)
    return "tiny", (96 if quick else 384), (8 if quick else 16), (16, 64)


def _requests(n: int, token_range) -> list[dict]:
    n_text, n_image = n // 2, n * 3 // 8
    items = make_items((n_text, n_image, n - n_text - n_image), token_range)
    return [{"input": {"text": it["text"], "images": [base64.b64encode(b).decode() for b in it.get("images", [])]}}
            for it in items]


def _start_server(model: str, device: str) -> tuple[subprocess.Popen, str, str]:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    log = tempfile.NamedTemporaryFile("w+", prefix="moca-serve-", suffix=".log", delete=False)
    proc = subprocess.Popen(
        [sys.executable, "-m", "moca.serve", "--model", model, "--device", device, "--port", str(port),
         "--batch-tokens", str(BATCH_TOKENS), "--max-queue", "1024"],
        stdout=log, stderr=subprocess.STDOUT, cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
    )
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 600
    while True:
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            log.seek(0)
            raise RuntimeError(f"moca.serve did not become ready:\n{log.read()[-3000:]}")
        try:
            if httpx.get(url + "/health", timeout=5).status_code == 200:
                return proc, url, log.name
        except httpx.TransportError:
            pass
        time.sleep(0.2)


def _occupancy(url: str) -> dict[str, float]:
    text = httpx.get(url + "/metrics", timeout=30).text
    return {s.name: s.value for f in text_string_to_metric_families(text) for s in f.samples
            if s.name in ("moca_batch_inputs_sum", "moca_batch_inputs_count", "moca_batch_tokens_sum",
                          "moca_forward_seconds_sum")}


async def _load(url: str, requests: list[dict], clients: int) -> tuple[float, np.ndarray, np.ndarray]:
    """`clients` tasks take the next request until none is left -> (wall s, latencies s, vectors in order)."""
    latencies = np.zeros(len(requests))
    vectors: list = [None] * len(requests)
    todo = iter(range(len(requests)))
    limits = httpx.Limits(max_connections=clients, max_keepalive_connections=clients)

    async def client(http: httpx.AsyncClient):
        for i in todo:
            t0 = time.perf_counter()
            r = await http.post("/v1/embeddings", json=requests[i])
            latencies[i] = time.perf_counter() - t0
            r.raise_for_status()
            vectors[i] = r.json()["data"][0]["embedding"]

    async with httpx.AsyncClient(base_url=url, timeout=600, limits=limits) as http:
        t0 = time.perf_counter()
        await asyncio.gather(*(client(http) for _ in range(clients)))
        wall = time.perf_counter() - t0
    return wall, latencies, np.asarray(vectors, dtype=np.float32)


def run(device: str, quick: bool) -> list[dict]:
    model, n, clients, token_range = _setup(device, quick)
    requests = _requests(n, token_range)
    proc, url, log = _start_server(model, device)
    try:
        asyncio.run(_load(url, requests[: 2 * clients], clients))  # connections and allocator warm
        results = {}
        for provider, k in ((f"moca serve, {clients} concurrent clients", clients), ("moca serve, 1 client", 1)):
            before = _occupancy(url)
            wall, lat, vec = asyncio.run(_load(url, requests, k))
            after = _occupancy(url)
            delta = {key: after[key] - before.get(key, 0.0) for key in after}
            results[provider] = (wall, lat, vec, delta)
    finally:
        proc.terminate()
        proc.wait(timeout=60)
        os.unlink(log)
    reference = results["moca serve, 1 client"][2]
    rows = []
    for provider, (wall, lat, vec, d) in results.items():
        forwards = d["moca_batch_inputs_count"]
        rows.append(dict(
            provider=provider, model=model, requests=n, items_per_s=n / wall,
            p50_ms=float(np.percentile(lat, 50) * 1e3), p99_ms=float(np.percentile(lat, 99) * 1e3),
            inputs_per_forward=d["moca_batch_inputs_sum"] / forwards,
            budget_fill=d["moca_batch_tokens_sum"] / forwards / BATCH_TOKENS,
            forward_ms=d["moca_forward_seconds_sum"] / forwards * 1e3,
            device_busy=d["moca_forward_seconds_sum"] / wall,
            max_abs_diff=float(np.abs(vec - reference).max()),
        ))
    return rows


def summary(rows: list[dict]) -> dict:
    concurrent, single = rows
    return {"serve_concurrent_vs_one_at_a_time": concurrent["items_per_s"] / single["items_per_s"]}
