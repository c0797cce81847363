"""Data-parallel routing: prefix-cache hits with prefix routing against round robin.

    python benchmarks/dp_routing.py [--groups 8] [--per-group 8] [--prefix-tokens 512]

Starts `pagoda serve --data-parallel-size 2` on the default model twice (PAGODA_DP_ROUTING=prefix,
then round_robin) and sends the same workload to each: `groups` long shared prefixes (workload
C's "system prompts", random words, about `prefix-tokens` tokens each), `per-group` requests per
prefix with their own question, interleaved so consecutive requests have different prefixes, 4
at a time, 16 output tokens each. Prints, per policy, the prefix-cache hit rate from /metrics
(`pagoda:prefix_cache_hits_total / pagoda:prefix_cache_queries_total`), the median TTFT and the
wall time, as one JSON object with the machine's CPU model.
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks.overload import cpu_model  # noqa: E402
from tests.server import RemoteServer  # noqa: E402

WORDS = [
    "alpha",
    "river",
    "stone",
    "cloud",
    "garden",
    "silver",
    "north",
    "quiet",
    "paper",
    "engine",
    "window",
    "forest",
]


def metric(text: str, name: str) -> float:
    for line in text.splitlines():
        if line.startswith(name + "{"):
            return float(line.rsplit(" ", 1)[1])
    raise KeyError(name)


def run(policy: str, prompts: list[str], log_dir: Path) -> dict[str, float]:
    server = RemoteServer(
        ["--data-parallel-size", "2", "--max-model-len", "2048"],
        env={"PAGODA_DP_ROUTING": policy},
        log_path=log_dir / f"dp-{policy}.log",
    )
    try:

        def one(prompt: str) -> float:
            body = {"prompt": prompt, "max_tokens": 16, "ignore_eos": True, "stream": True}
            start = time.monotonic()
            with httpx.stream("POST", f"{server.url}/v1/completions", json=body, timeout=600) as r:
                for line in r.iter_lines():
                    if line.startswith("data: "):
                        return time.monotonic() - start  # the first token
            raise RuntimeError("no token")

        start = time.monotonic()
        with ThreadPoolExecutor(4) as pool:
            ttfts = list(pool.map(one, prompts))
        wall = time.monotonic() - start
        text = httpx.get(f"{server.url}/metrics", timeout=30).text
    finally:
        server.stop()
    hits = metric(text, "pagoda:prefix_cache_hits_total")
    queries = metric(text, "pagoda:prefix_cache_queries_total")
    return {
        "prefix_hit_rate": round(hits / queries, 3),
        "hit_tokens": hits,
        "queried_tokens": queries,
        "ttft_ms_median": round(1000 * statistics.median(ttfts), 1),
        "wall_s": round(wall, 1),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--groups", type=int, default=8)
    parser.add_argument("--per-group", type=int, default=8)
    parser.add_argument("--prefix-tokens", type=int, default=512)
    parser.add_argument("--log-dir", type=Path, default=Path("/tmp/pagoda-dp"))
    args = parser.parse_args()
    args.log_dir.mkdir(parents=True, exist_ok=True)
    rng = random.Random(0)
    prefixes = [
        " ".join(rng.choice(WORDS) for _ in range(args.prefix_tokens)) for _ in range(args.groups)
    ]
    prompts = [
        f"{prefixes[g]}\nQuestion {i}: what comes next?"
        for i in range(args.per_group)
        for g in range(args.groups)
    ]
    results = {"cpu": cpu_model(), "requests": len(prompts)}
    for policy in ("prefix", "round_robin"):
        results[policy] = run(policy, prompts, args.log_dir)
    print(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
