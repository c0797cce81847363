#!/usr/bin/env python3
"""Turn one run directory of the side-by-side scripts into the Markdown tables of BENCHMARKS.md.

Usage: python3 benchmarks/summarize.py RUN_DIR

Reads what the scripts leave in RUN_DIR: `a-<engine>-c<N>.json` and `c-<engine>-prefix-<mode>.json`
(saved by `vllm bench serve` or `pagoda bench serve`, vLLM's keys), `b-<engine>.txt` (the
`Throughput: ...` lines both throughput commands print), `cold_start.tsv` and `machine.txt`.
Standard library only, so any python3 runs it. A cell with no result says so; nothing is guessed.
"""

from __future__ import annotations

import json
import re
import statistics
import sys
from pathlib import Path

ENGINES = {
    "pagoda": "Pagoda",
    "vllm": "vLLM-CPU",
    "vllm_fp32": "vLLM-CPU (float32)",
    "llamacpp": "llama.cpp server",
    "hf": "HF transformers (batch 16)",
}
MISSING = "not measured"
_THROUGHPUT = re.compile(
    r"Throughput: ([\d.]+) requests/s, ([\d.]+) total tokens/s, ([\d.]+) output tokens/s"
)
_HF = re.compile(r"output ([\d.]+) tok/s, total ([\d.]+) tok/s")


def _load(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def _duration_ms(ms: float) -> str:
    return f"{ms:.0f} ms" if ms < 1000 else f"{ms / 1000:.2f} s"


def _failed(result: dict) -> str:
    failed = int(result.get("failed", 0) or 0)
    return f" ({failed} failed)" if failed else ""


def _table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines)


def _engines_present(run_dir: Path, pattern: str) -> list[str]:
    found = {m.group(1) for p in run_dir.iterdir() if (m := re.match(pattern, p.name))}
    return [engine for engine in ENGINES if engine in found]


def workload_a(run_dir: Path) -> str:
    engines = _engines_present(run_dir, r"a-(\w+)-c\d+\.json$")
    levels = sorted(
        {
            int(m.group(1))
            for p in run_dir.glob("a-*-c*.json")
            if (m := re.search(r"-c(\d+)\.json$", p.name))
        }
    )
    rows = []
    for level in levels:
        num_prompts = ""
        row = []
        for engine in engines:
            result = _load(run_dir / f"a-{engine}-c{level}.json")
            if result is None:
                row.append(MISSING)
                continue
            num_prompts = str(result.get("num_prompts", ""))
            row.append(
                f"{result['output_throughput']:.0f} · {result['median_tpot_ms']:.1f} ms · "
                f"{_duration_ms(result['median_ttft_ms'])}{_failed(result)}"
            )
        rows.append([f"{level} ({num_prompts} requests)", *row])
    header = ["concurrency"] + [f"{ENGINES[e]}: out tok/s · TPOT p50 · TTFT p50" for e in engines]
    return "### Workload A (serving)\n\n" + _table(header, rows)


def workload_b(run_dir: Path) -> str:
    rows = []
    for engine in _engines_present(run_dir, r"b-(\w+)\.txt$"):
        text = (run_dir / f"b-{engine}.txt").read_text()
        if match := _THROUGHPUT.search(text):
            requests, total, output = match.groups()
            rows.append([ENGINES[engine], requests, total, output])
        elif match := _HF.search(text):
            output, total = match.groups()
            rows.append([ENGINES[engine], "-", total, output])
        else:
            rows.append([ENGINES[engine], MISSING, MISSING, MISSING])
    header = ["engine", "requests/s", "total tokens/s", "output tokens/s"]
    return "### Workload B (offline throughput)\n\n" + _table(header, rows)


def workload_c(run_dir: Path) -> str:
    rows = []
    for engine in _engines_present(run_dir, r"c-(\w+)-prefix-(?:on|off)\.json$"):
        on = _load(run_dir / f"c-{engine}-prefix-on.json")
        off = _load(run_dir / f"c-{engine}-prefix-off.json")
        cells = []
        for result in (on, off):
            cells.append(
                MISSING
                if result is None
                else f"{_duration_ms(result['median_ttft_ms'])} / "
                f"{_duration_ms(result['mean_ttft_ms'])}{_failed(result)}"
            )
        ratio = MISSING
        if on and off and on["median_ttft_ms"] > 0:
            ratio = f"{off['median_ttft_ms'] / on['median_ttft_ms']:.1f}×"
        rows.append([ENGINES[engine], *cells, ratio])
    header = [
        "engine",
        "TTFT p50 / mean, prefix caching on",
        "TTFT p50 / mean, off",
        "p50 off / on",
    ]
    return "### Workload C (shared 1,024-token prefix)\n\n" + _table(header, rows)


def cold_start(run_dir: Path) -> str:
    seconds: dict[str, list[float]] = {}
    path = run_dir / "cold_start.tsv"
    if path.exists():
        for line in path.read_text().splitlines()[1:]:
            engine, _, value = line.split("\t")
            seconds.setdefault(engine, []).append(float(value))
    rows = [
        [ENGINES.get(e, e), f"{statistics.median(v):.2f}", ", ".join(f"{s:.2f}" for s in v)]
        for e, v in seconds.items()
    ]
    header = ["engine", "median seconds to first 200 from /health", "each launch"]
    return "### Cold start\n\n" + _table(header, rows)


def main(argv: list[str]) -> int:
    if len(argv) != 2:
        print(__doc__.strip().splitlines()[2], file=sys.stderr)
        return 2
    run_dir = Path(argv[1])
    machine = run_dir / "machine.txt"
    parts = [f"## Run {run_dir.name}"]
    if machine.exists():
        parts.append("```\n" + machine.read_text().strip() + "\n```")
    parts += [workload_a(run_dir), workload_b(run_dir), workload_c(run_dir), cold_start(run_dir)]
    print("\n\n".join(parts))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
