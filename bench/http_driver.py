"""Drive an OpenAI-compatible server with a benchmark's requests and stamp every token as the
client receives it (bench/serving.py's HTTP path).

Each request is one streamed ``/v1/completions`` call with its token ids as the prompt,
``max_tokens`` its output length, ``ignore_eos`` and greedy decoding; it is sent at its
arrival offset. Each SSE chunk's ``token_ids`` say how many tokens it brings (one per step
while the client keeps up); each is stamped when its chunk arrives.

``run_in_subprocess`` runs the client in a fresh interpreter so that its event loop does not
share a GIL with a server in the benchmark's own process.
"""

from __future__ import annotations

import asyncio
import json
import multiprocessing
import time

import httpx


async def _one(http: httpx.AsyncClient, model: str, prompt: list[int], max_tokens: int, delay: float,
               start: float) -> list[float]:
    await asyncio.sleep(max(0.0, delay - (time.perf_counter() - start)))
    body = {"model": model, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0, "ignore_eos": True,
            "stream": True, "return_token_ids": True}
    stamps: list[float] = []
    async with http.stream("POST", "/v1/completions", json=body) as response:
        if response.status_code != 200:
            raise RuntimeError(f"HTTP {response.status_code}: {(await response.aread()).decode()[:300]}")
        async for line in response.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            if "error" in chunk:
                raise RuntimeError(chunk["error"]["message"])
            choice = chunk["choices"][0]
            now = time.perf_counter() - start
            stamps += [now] * len(choice.get("token_ids") or [])
    if len(stamps) != max_tokens:
        raise RuntimeError(f"asked for {max_tokens} tokens, the server streamed {len(stamps)}")
    return stamps


async def _drive(url: str, model: str, requests: list[tuple[list[int], int]], arrivals: list[float]):
    limits = httpx.Limits(max_connections=len(requests) + 8, max_keepalive_connections=len(requests) + 8)
    async with httpx.AsyncClient(base_url=url, limits=limits, timeout=httpx.Timeout(600.0)) as http:
        start = time.perf_counter()
        return await asyncio.gather(*(_one(http, model, p, n, a, start) for (p, n), a in zip(requests, arrivals)))


def drive(url: str, model: str, requests: list[tuple[list[int], int]], arrivals: list[float]) -> list[list[float]]:
    """Per request, the client-side time (s from the run's start) of each of its tokens."""
    return asyncio.run(_drive(url, model, requests, arrivals))


def _child(url, model, requests, arrivals, queue) -> None:
    try:
        queue.put(("ok", drive(url, model, requests, arrivals)))
    except Exception as exc:  # noqa: BLE001 - reported in the parent
        queue.put(("error", f"{type(exc).__name__}: {exc}"))


def run_in_subprocess(url: str, model: str, requests: list[tuple[list[int], int]],
                      arrivals: list[float]) -> list[list[float]]:
    ctx = multiprocessing.get_context("spawn")
    queue = ctx.Queue()
    proc = ctx.Process(target=_child, args=(url, model, requests, arrivals, queue), daemon=True)
    proc.start()
    status, value = queue.get()
    proc.join(timeout=30)
    if status != "ok":
        raise RuntimeError(f"HTTP client failed: {value}")
    return value


def wait_ready(url: str, timeout: float = 120.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if httpx.get(url + "/health", timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    raise RuntimeError(f"no server answered {url}/health within {timeout:.0f} s")
