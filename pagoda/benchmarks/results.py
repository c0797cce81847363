"""Benchmark results: the arithmetic, vLLM's printed blocks, and the JSON files.

The labels, their layout (label left-aligned in 40 columns, value in 10) and the JSON keys are the
ones `vllm bench` prints and saves, so a Pagoda run and a vLLM run can be diffed line by line and
read by the same scripts. Times are measured in seconds and reported in milliseconds where vLLM
reports milliseconds.
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

# The serving metrics, in vLLM's order: key, abbreviation, section title.
SERVE_METRICS: dict[str, tuple[str, str]] = {
    "ttft": ("TTFT", "Time to First Token"),
    "tpot": ("TPOT", "Time per Output Token (excl. 1st token)"),
    "itl": ("ITL", "Inter-token Latency"),
    "e2el": ("E2EL", "End-to-end Latency"),
}
LATENCY_PERCENTILES = (10, 25, 50, 75, 90, 99)
_WIDTH = 50


@dataclass(slots=True)
class RequestOutcome:
    """What the client measured for one request. Times are `time.perf_counter()` seconds.

    `itl` holds the gaps between successive chunks that carried text, after the first one;
    `output_tokens` is the server's `usage.completion_tokens` (0 until known).
    """

    prompt_len: int = 0
    success: bool = False
    start_time: float = 0.0
    ttft: float = 0.0
    latency: float = 0.0
    itl: list[float] = field(default_factory=list)
    output_tokens: int = 0
    generated_text: str = ""
    error: str = ""


@dataclass(frozen=True, slots=True)
class MetricStats:
    """Mean, median, standard deviation and percentiles of one latency metric, in ms."""

    mean: float
    median: float
    std: float
    percentiles: tuple[tuple[float, float], ...]

    @classmethod
    def of(cls, values_s: Sequence[float], percentiles: Sequence[float]) -> MetricStats:
        """Stats of `values_s` (seconds); an empty list gives zeros, as in vLLM."""
        values = np.asarray(values_s, dtype=np.float64) * 1000.0
        if values.size == 0:
            return cls(0.0, 0.0, 0.0, tuple((float(p), 0.0) for p in percentiles))
        return cls(
            mean=float(np.mean(values)),
            median=float(np.median(values)),
            std=float(np.std(values)),
            percentiles=tuple((float(p), float(np.percentile(values, p))) for p in percentiles),
        )


@dataclass(frozen=True, slots=True)
class ServeMetrics:
    """The aggregate result of one `pagoda bench serve` run."""

    completed: int
    failed: int
    total_input: int
    total_output: int
    duration: float
    request_throughput: float
    request_goodput: float | None
    output_throughput: float
    total_token_throughput: float
    max_output_tokens_per_s: float
    max_concurrent_requests: int
    stats: dict[str, MetricStats]
    tpots: list[float]


def percentile_word(p: float) -> str:
    """99 -> "99", 99.9 -> "99.9": the percentile as vLLM writes it in labels and keys."""
    return str(int(p)) if float(p).is_integer() else str(p)


def request_tpot(outcome: RequestOutcome) -> float | None:
    """Seconds per output token after the first; None for a request with one token or fewer."""
    if outcome.output_tokens <= 1:
        return None
    return (outcome.latency - outcome.ttft) / (outcome.output_tokens - 1)


def compute_serve_metrics(
    outcomes: Sequence[RequestOutcome],
    duration: float,
    percentiles: Sequence[float] = (99,),
    goodput_slos_ms: dict[str, float] | None = None,
) -> ServeMetrics:
    """Aggregate per-request outcomes over a run that took `duration` seconds.

    Only successful requests count towards tokens and latencies. `goodput_slos_ms` maps "ttft",
    "tpot" or "e2el" to a bound in ms; a request is good when it meets every bound.
    """
    good = [o for o in outcomes if o.success]
    tpots = [t for t in (request_tpot(o) for o in good) if t is not None]
    total_input = sum(o.prompt_len for o in good)
    total_output = sum(o.output_tokens for o in good)
    request_goodput = None
    if goodput_slos_ms:
        num_good = sum(1 for o in good if _meets_slos(o, goodput_slos_ms))
        request_goodput = num_good / duration if duration > 0 else 0.0
    peak_tokens, peak_concurrency = _peaks(good)
    values: dict[str, list[float]] = {
        "ttft": [o.ttft for o in good],
        "tpot": tpots,
        "itl": [gap for o in good for gap in o.itl],
        "e2el": [o.latency for o in good],
    }
    return ServeMetrics(
        completed=len(good),
        failed=len(outcomes) - len(good),
        total_input=total_input,
        total_output=total_output,
        duration=duration,
        request_throughput=_rate(len(good), duration),
        request_goodput=request_goodput,
        output_throughput=_rate(total_output, duration),
        total_token_throughput=_rate(total_input + total_output, duration),
        max_output_tokens_per_s=peak_tokens,
        max_concurrent_requests=peak_concurrency,
        stats={name: MetricStats.of(vals, percentiles) for name, vals in values.items()},
        tpots=tpots,
    )


def _rate(count: float, duration: float) -> float:
    return count / duration if duration > 0 else 0.0


def _meets_slos(outcome: RequestOutcome, slos_ms: dict[str, float]) -> bool:
    measured_ms = {
        "ttft": outcome.ttft * 1000.0,
        "tpot": (request_tpot(outcome) or 0.0) * 1000.0,
        "e2el": outcome.latency * 1000.0,
    }
    return all(measured_ms[name] <= bound for name, bound in slos_ms.items())


def _peaks(good: Sequence[RequestOutcome]) -> tuple[float, int]:
    """Most text chunks received in one wall-clock second, and most requests open in one second.

    Seconds are counted from the earliest request start; a request is "open" in every second its
    [start, end] interval touches (vLLM's definitions).
    """
    if not good:
        return 0.0, 0
    origin = min(o.start_time for o in good)
    end = max(o.start_time + o.latency for o in good)
    num_seconds = int(math.ceil(end - origin)) + 1
    arrivals = np.concatenate(
        [o.start_time + o.ttft + np.cumsum([0.0, *o.itl]) - origin for o in good]
    )
    buckets = np.clip(arrivals.astype(np.int64), 0, num_seconds - 1)
    tokens_per_second = np.bincount(buckets, minlength=num_seconds)
    # A difference array: +1 in the second a request opens, -1 after the second it closes.
    opened = np.zeros(num_seconds + 1, dtype=np.int64)
    for o in good:
        first = int(o.start_time - origin)
        last = min(int(o.start_time + o.latency - origin), num_seconds - 1)
        opened[first] += 1
        opened[last + 1] -= 1
    concurrency = np.cumsum(opened[:-1])
    return float(tokens_per_second.max()), int(concurrency.max())


# Printing.


def _line(label: str, value: float | int | str) -> str:
    if isinstance(value, float):
        return f"{label:<40} {value:<10.2f}"
    return f"{label:<40} {value!s:<10}"


def format_serve_result(
    metrics: ServeMetrics,
    max_concurrency: int | None,
    request_rate: float,
    selected_metrics: Sequence[str] = ("ttft", "tpot", "itl"),
) -> str:
    """vLLM's "Serving Benchmark Result" block, line for line (no trailing newline)."""
    lines = [
        f"{' Serving Benchmark Result ':=^{_WIDTH}}",
        _line("Successful requests:", metrics.completed),
        _line("Failed requests:", metrics.failed),
    ]
    if max_concurrency is not None:
        lines.append(_line("Maximum request concurrency:", max_concurrency))
    if math.isfinite(request_rate):
        lines.append(_line("Request rate configured (RPS):", float(request_rate)))
    lines += [
        _line("Benchmark duration (s):", metrics.duration),
        _line("Total input tokens:", metrics.total_input),
        _line("Total generated tokens:", metrics.total_output),
        _line("Request throughput (req/s):", metrics.request_throughput),
    ]
    if metrics.request_goodput is not None:
        lines.append(_line("Request goodput (req/s):", metrics.request_goodput))
    lines += [
        _line("Output token throughput (tok/s):", metrics.output_throughput),
        _line("Peak output token throughput (tok/s):", metrics.max_output_tokens_per_s),
        _line("Peak concurrent requests:", float(metrics.max_concurrent_requests)),
        _line("Total Token throughput (tok/s):", metrics.total_token_throughput),
    ]
    for name in selected_metrics:
        abbreviation, title = SERVE_METRICS[name]
        stats = metrics.stats[name]
        lines.append(f"{title:-^{_WIDTH}}")
        lines.append(_line(f"Mean {abbreviation} (ms):", stats.mean))
        lines.append(_line(f"Median {abbreviation} (ms):", stats.median))
        for p, value in stats.percentiles:
            lines.append(_line(f"P{percentile_word(p)} {abbreviation} (ms):", value))
    lines.append("=" * _WIDTH)
    return "\n".join(lines)


def serve_result_json(
    metrics: ServeMetrics, outcomes: Sequence[RequestOutcome], detailed: bool
) -> dict[str, Any]:
    """The benchmark part of vLLM's saved result (run settings are added by the caller).

    Per-request lists (`input_lens`, `output_lens`, `ttfts`, `itls`, `generated_texts`,
    `errors`) are kept only when `detailed`, as with vLLM's `--save-detailed`.
    """
    result: dict[str, Any] = {
        "duration": metrics.duration,
        "completed": metrics.completed,
        "failed": metrics.failed,
        "total_input_tokens": metrics.total_input,
        "total_output_tokens": metrics.total_output,
        "request_throughput": metrics.request_throughput,
        "request_goodput": metrics.request_goodput,
        "output_throughput": metrics.output_throughput,
        "total_token_throughput": metrics.total_token_throughput,
        "max_output_tokens_per_s": metrics.max_output_tokens_per_s,
        "max_concurrent_requests": metrics.max_concurrent_requests,
    }
    if detailed:
        result["input_lens"] = [o.prompt_len for o in outcomes]
        result["output_lens"] = [o.output_tokens for o in outcomes]
        result["ttfts"] = [o.ttft for o in outcomes]
        result["itls"] = [o.itl for o in outcomes]
        result["generated_texts"] = [o.generated_text for o in outcomes]
        result["errors"] = [o.error for o in outcomes]
    for name, stats in metrics.stats.items():
        result[f"mean_{name}_ms"] = stats.mean
        result[f"median_{name}_ms"] = stats.median
        result[f"std_{name}_ms"] = stats.std
        for p, value in stats.percentiles:
            result[f"p{percentile_word(p)}_{name}_ms"] = value
    return result


def format_throughput(
    num_requests: int, prompt_tokens: int, output_tokens: int, elapsed: float
) -> str:
    """`vllm bench throughput`'s three lines."""
    total = prompt_tokens + output_tokens
    return (
        f"Throughput: {_rate(num_requests, elapsed):.2f} requests/s, "
        f"{_rate(total, elapsed):.2f} total tokens/s, "
        f"{_rate(output_tokens, elapsed):.2f} output tokens/s\n"
        f"Total num prompt tokens:  {prompt_tokens}\n"
        f"Total num output tokens:  {output_tokens}"
    )


def throughput_json(
    num_requests: int, prompt_tokens: int, output_tokens: int, elapsed: float
) -> dict[str, Any]:
    """vLLM's throughput keys, plus the prompt/output split and the output rate."""
    total = prompt_tokens + output_tokens
    return {
        "elapsed_time": elapsed,
        "num_requests": num_requests,
        "total_num_tokens": total,
        "requests_per_second": _rate(num_requests, elapsed),
        "tokens_per_second": _rate(total, elapsed),
        "total_num_prompt_tokens": prompt_tokens,
        "total_num_output_tokens": output_tokens,
        "output_tokens_per_second": _rate(output_tokens, elapsed),
    }


def latency_percentiles(latencies: Sequence[float]) -> dict[str, float]:
    """The 10th to 99th percentiles of `latencies`, keyed "10" ... "99" as in vLLM's JSON."""
    values = np.asarray(latencies, dtype=np.float64)
    return {str(p): float(np.percentile(values, p)) for p in LATENCY_PERCENTILES}


def format_latency(latencies: Sequence[float]) -> str:
    """`vllm bench latency`'s lines: the average, then one line per percentile."""
    lines = [f"Avg latency: {float(np.mean(latencies))} seconds"]
    for p, value in latency_percentiles(latencies).items():
        lines.append(f"{p}% percentile latency: {value} seconds")
    return "\n".join(lines)


def latency_json(latencies: Sequence[float]) -> dict[str, Any]:
    """vLLM's latency keys: `avg_latency`, `latencies`, `percentiles`."""
    return {
        "avg_latency": float(np.mean(latencies)),
        "latencies": [float(t) for t in latencies],
        "percentiles": latency_percentiles(latencies),
    }


def write_json(path: str | Path, data: dict[str, Any]) -> Path:
    """Write `data` as indented JSON, creating the parent directory; returns the path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=4) + "\n")
    return path
