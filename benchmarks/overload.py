"""Overload and drain targets of the reliability work (issue 18), against a live `pagoda serve`.

    python benchmarks/overload.py overload   # 300 requests at once, the queue bound set to ~30 s
    python benchmarks/overload.py drain      # SIGTERM with 16 streams in flight, 60 s and 1 s

`overload` starts a server with `--max-num-seqs 16 --max-queued-requests Q`, where Q is what the
machine finishes in about 30 s at concurrency 16 (measured first with 16 requests of the same
size), sends 300 non-streaming requests of 256 tokens at once and reports how many were refused,
how fast each refusal came back, whether each carried Retry-After, and whether every admitted one
completed. `drain` runs the SIGTERM scenario and reports per-stream endings. Both print one JSON
object (with the machine's CPU model) for BENCHMARKS.md; nothing here asserts timings.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import platform
import signal
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from tests.server import RemoteServer  # noqa: E402

BODY = {"prompt": "Write a long story about a lighthouse.", "max_tokens": 256, "ignore_eos": True}


def cpu_model() -> str:
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return platform.processor()


async def post_raw(port: int, body: bytes) -> tuple[int, float, dict[str, str], Any]:
    """One POST /v1/completions on its own connection, with a minimal HTTP/1.1 client: a
    general client (httpx) with 300 requests in flight spends seconds of this 2-core machine's
    CPU on its own bookkeeping, which the server's latency would then include."""
    start = time.monotonic()
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(
        b"POST /v1/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n"
        b"Content-Type: application/json\r\nContent-Length: %d\r\n\r\n%s" % (len(body), body)
    )
    await writer.drain()
    raw = await reader.read()
    elapsed = time.monotonic() - start
    writer.close()
    head, _, payload = raw.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    headers = {k.strip().lower(): v.strip() for k, _, v in (x.partition(":") for x in lines[1:])}
    return int(lines[0].split()[1]), elapsed, headers, json.loads(payload or b"null")


async def post_all(port: int, count: int) -> list[tuple[int, float, dict[str, str], Any]]:
    body = json.dumps(BODY).encode()
    return await asyncio.gather(*(post_raw(port, body) for _ in range(count)))


def overload(log_dir: Path) -> dict[str, Any]:
    # Calibrate: requests per second finished at concurrency 16 with the same requests.
    server = RemoteServer(
        ["--max-model-len", "512", "--max-num-seqs", "16"], log_path=log_dir / "calibrate.log"
    )
    try:
        start = time.monotonic()
        asyncio.run(post_all(server.port, 16))
        rate = 16 / (time.monotonic() - start)
    finally:
        server.stop()
    bound = max(1, round(rate * 30))
    server = RemoteServer(
        ["--max-model-len", "512", "--max-num-seqs", "16", "--max-queued-requests", str(bound)],
        log_path=log_dir / "overload.log",
    )
    try:
        start = time.monotonic()
        results = asyncio.run(post_all(server.port, 300))
        wall = time.monotonic() - start
        metrics = httpx.get(f"{server.url}/metrics", timeout=30).text
    finally:
        code = server.stop()
    refused = [r for r in results if r[0] == 429]
    admitted = [r for r in results if r[0] == 200]
    refusal_s = sorted(r[1] for r in refused)
    rejected_line = next(
        (
            line
            for line in metrics.splitlines()
            if line.startswith("pagoda:requests_rejected_total{")
        ),
        "",
    )
    return {
        "cpu": cpu_model(),
        "finish_rate_req_s_at_c16": round(rate, 3),
        "max_queued_requests": bound,
        "sent": len(results),
        "refused_429": len(refused),
        "admitted_200": len(admitted),
        "other_status": sorted({r[0] for r in results} - {200, 429}),
        "refusal_latency_ms_p50": round(1000 * statistics.median(refusal_s), 1)
        if refused
        else None,
        "refusal_latency_ms_max": round(1000 * refusal_s[-1], 1) if refused else None,
        "refusals_with_retry_after": sum("retry-after" in r[2] for r in refused),
        "retry_after_values": sorted({r[2].get("retry-after") for r in refused}),
        "admitted_completed_256_tokens": sum(
            r[3]["usage"]["completion_tokens"] == 256 for r in admitted
        ),
        "admitted_latency_s_max": round(max(r[1] for r in admitted), 1) if admitted else None,
        "wall_s": round(wall, 1),
        "metrics_rejected": rejected_line,
        "server_exit": code,
    }


async def streams(
    url: str, count: int, max_tokens: int, all_started: asyncio.Event
) -> list[list[Any]]:
    """Run `count` streams; `all_started` is set once each has received an event."""
    body = {"prompt": "Count:", "max_tokens": max_tokens, "ignore_eos": True, "stream": True}
    events: list[list[Any]] = [[] for _ in range(count)]
    started = [asyncio.Event() for _ in range(count)]
    async with httpx.AsyncClient(base_url=url, timeout=300) as client:

        async def one(i: int) -> None:
            try:
                async with client.stream("POST", "/v1/completions", json=body) as response:
                    async for line in response.aiter_lines():
                        if line.startswith("data: "):
                            data = line.removeprefix("data: ")
                            events[i].append(data if data == "[DONE]" else json.loads(data))
                            started[i].set()
            except httpx.HTTPError as exc:
                events[i].append(f"transport error: {exc!r}")
                started[i].set()

        tasks = [asyncio.create_task(one(i)) for i in range(count)]
        await asyncio.gather(*(event.wait() for event in started))
        all_started.set()
        await asyncio.gather(*tasks)
    return events


def drain(log_dir: Path, grace: str) -> dict[str, Any]:
    server = RemoteServer(
        ["--max-model-len", "1024", "--max-num-seqs", "32", "--graceful-shutdown-timeout", grace],
        log_path=log_dir / f"drain-{grace}.log",
    )

    async def run() -> tuple[list[list[Any]], int | None, float]:
        all_started = asyncio.Event()
        task = asyncio.create_task(
            streams(server.url, 16, 128 if grace != "1" else 900, all_started)
        )
        await all_started.wait()
        signalled = time.monotonic()
        server.process.send_signal(signal.SIGTERM)
        await asyncio.sleep(0.5)
        late: int | None
        try:
            async with httpx.AsyncClient(timeout=10) as client:
                late = (await client.post(f"{server.url}/v1/completions", json=BODY)).status_code
        except httpx.HTTPError:
            late = None  # refused at the socket
        events = await task
        return events, late, signalled

    events, late, signalled = asyncio.run(run())
    code = server.process.wait(120)
    exited_after = time.monotonic() - signalled
    server.stop()
    finished = sum(
        e[-1] == "[DONE]" and e[-2].get("choices", [{}])[0].get("finish_reason") == "length"
        for e in events
        if len(e) >= 2 and isinstance(e[-2], dict)
    )
    errored = sum(
        e[-1] == "[DONE]" and isinstance(e[-2], dict) and "error" in e[-2] for e in events
    )
    return {
        "cpu": cpu_model(),
        "grace_s": float(grace),
        "streams": len(events),
        "finished_normally": finished,
        "ended_with_error_event_and_done": errored,
        "torn": len(events) - finished - errored,
        "request_after_signal": late,
        "exit_code": code,
        "exited_after_s": round(exited_after, 1),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("scenario", choices=["overload", "drain"])
    parser.add_argument("--log-dir", type=Path, default=Path("/tmp/pagoda-reliability"))
    args = parser.parse_args()
    args.log_dir.mkdir(parents=True, exist_ok=True)
    if args.scenario == "overload":
        print(json.dumps(overload(args.log_dir), indent=2))
    else:
        for grace in ("60", "1"):
            print(json.dumps(drain(args.log_dir, grace), indent=2))


if __name__ == "__main__":
    main()
