"""`pagoda tour`: each of the engine's optimisations at work on this machine, on and off.

A walkthrough in the order a serving engine is usually explained, every step measured here and
now on the served model (the default one unless `--model`), with the optimisation on and then
off (or against the naive alternative):

1. **Paged KV cache**: the KV memory a mixed-length batch holds in 16-token blocks against a
   contiguous reservation of `max_model_len` per request (the lengths are the batch's real ones).
2. **Continuous batching**: requests arriving over time, admitted at token granularity against
   static batches that start together and wait for their longest member (requests/s, latency).
3. **Prefix caching**: time to first token of questions that share a 1,024-token system prompt.
4. **Chunked prefill**: the inter-token latency of running streams while a long prompt arrives.
5. **Streaming**: when the first words reach the reader, streamed or in one response.
6. **CPU kernels**: single-stream decode speed with the compiled kernels and in plain PyTorch
   (that run in a child process with PAGODA_CPU_KERNELS=0).
7. **Speculative decoding**: single-stream decode speed with n-gram speculation on a text that
   repeats itself.

It prints one table, saves one PNG per step (matplotlib) and `tour.json` under `--output-dir`.
`--quick` runs smaller versions of every step (CI runs it; its system prompt is 512 tokens). docs/walkthrough.md shows a run.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Coroutine
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from tqdm.auto import tqdm

from pagoda.benchmarks.datasets import RandomDataset

MAX_MODEL_LEN = 2048
SYSTEM_PROMPT_TOKENS = 1024
# A text that repeats itself: what n-gram speculation feeds on (copying, editing, quoting).
REPEATING_TEXT = (
    "The paged KV cache stores keys and values in fixed-size blocks, so that memory is allocated "
    "as a request grows and returned when it finishes. "
)


@dataclass(slots=True)
class Step:
    """One measured step: a quantity with the optimisation on and off (`better`: "higher" or
    "lower"), and the plot that shows it."""

    name: str
    quantity: str
    unit: str
    on: float
    off: float
    better: str
    plot: str = ""
    details: dict[str, Any] = field(default_factory=dict)

    @property
    def gain(self) -> float:
        """How many times better `on` is than `off`."""
        if self.better == "higher":
            return self.on / self.off if self.off else float("inf")
        return self.off / self.on if self.on else float("inf")


@dataclass(slots=True)
class Timed:
    """When each output of one request arrived (monotonic seconds) and how many tokens each
    carried; `arrival` is when it was sent."""

    arrival: float
    times: list[float] = field(default_factory=list)
    tokens: list[int] = field(default_factory=list)

    @property
    def ttft(self) -> float:
        return self.times[0] - self.arrival

    @property
    def latency(self) -> float:
        return self.times[-1] - self.arrival

    @property
    def gaps(self) -> list[float]:
        return [b - a for a, b in zip(self.times, self.times[1:])]


class Tour:
    """Runs the steps (module docstring) with engines built from `model` and `quick`'s sizes."""

    def __init__(self, model: str | None, quick: bool, output_dir: Path) -> None:
        self.model = model
        self.quick = quick
        self.output_dir = output_dir
        self.steps: list[Step] = []
        self._tokenizer: Any = None

    # --- engines and requests -----------------------------------------------------------------

    def engine(self, **options: Any) -> Any:
        from pagoda.config import EngineArgs
        from pagoda.engine.async_llm import AsyncLLM

        kwargs: dict[str, Any] = {"max_model_len": MAX_MODEL_LEN, **options}
        if self.model is not None:
            kwargs["model"] = self.model
        args = EngineArgs(usage_context="llm", disable_log_stats=True, **kwargs)
        engine = AsyncLLM(args.create_engine_config(), log_stats=False)
        if self._tokenizer is None:
            self._tokenizer = engine.get_tokenizer()
        return engine

    def dataset(self, seed: int = 0) -> RandomDataset:
        if self._tokenizer is None:
            self.engine().shutdown()
        return RandomDataset(self._tokenizer, seed=seed)

    @staticmethod
    async def timed(
        engine: Any, token_ids: list[int], max_tokens: int, request_id: str, **params: Any
    ) -> Timed:
        """Send one greedy request of `max_tokens` (EOS ignored) and time its outputs."""
        from pagoda.sampling_params import RequestOutputKind, SamplingParams

        sampling = SamplingParams(
            temperature=0.0,
            max_tokens=max_tokens,
            ignore_eos=True,
            output_kind=params.pop("output_kind", RequestOutputKind.DELTA),
            **params,
        )
        record = Timed(arrival=time.monotonic())
        async for output in engine.generate({"prompt_token_ids": token_ids}, sampling, request_id):
            record.times.append(time.monotonic())
            record.tokens.append(sum(len(o.token_ids) for o in output.outputs))
        return record

    @staticmethod
    def run(engine: Any, work: Callable[[], Coroutine[Any, Any, Any]]) -> Any:
        try:
            return asyncio.run(work())
        finally:
            engine.shutdown()

    # --- the steps ----------------------------------------------------------------------------

    def paged_kv_cache(self) -> Step:
        count = 8 if self.quick else 48
        prompt_len, output_len = (128, 32) if self.quick else (256, 128)
        requests = self.dataset(1).sample(count, prompt_len, output_len, range_ratio=0.9)
        engine = self.engine()
        block_size = engine.config.cache_config.block_size
        bytes_per_token = _kv_bytes_per_token(engine)

        async def work() -> list[Timed]:
            return await asyncio.gather(
                *(
                    self.timed(engine, r.prompt_token_ids, r.expected_output_len, f"kv-{i}")
                    for i, r in enumerate(requests)
                )
            )

        self.run(engine, work)
        lengths = [len(r.prompt_token_ids) + r.expected_output_len for r in requests]
        paged = sum(-(-length // block_size) * block_size for length in lengths)
        contiguous = MAX_MODEL_LEN * len(lengths)
        used = sum(lengths)
        mib = bytes_per_token / 2**20
        plot = self.plot_bars(
            "1-paged-kv-cache",
            "KV memory of one mixed-length batch",
            "MiB",
            {
                "tokens held": used * mib,
                "paged (blocks of 16)": paged * mib,
                f"contiguous ({MAX_MODEL_LEN} each)": contiguous * mib,
            },
        )
        return Step(
            "Paged KV cache",
            f"KV memory for {count} requests",
            "MiB",
            paged * mib,
            contiguous * mib,
            "lower",
            plot,
            {
                "waste_paged": 1 - used / paged,
                "waste_contiguous": 1 - used / contiguous,
                "tokens": used,
            },
        )

    def continuous_batching(self) -> list[Step]:
        count = 10 if self.quick else 40
        batch = 8
        rate = 3.0  # requests per second, Poisson
        requests = self.dataset(2).sample(count, 64, 48 if self.quick else 96, range_ratio=0.9)
        gaps = RandomDataset(self._tokenizer, seed=3).rng.exponential(1 / rate, count)
        results: dict[str, list[Timed]] = {}
        for mode in ("continuous", "static"):
            engine = self.engine(max_num_seqs=batch)

            async def work(mode: str = mode, engine: Any = engine) -> list[Timed]:
                start = time.monotonic()
                arrivals = [start + float(sum(gaps[: i + 1])) for i in range(count)]

                async def one(i: int, max_tokens: int) -> Timed:
                    await asyncio.sleep(max(0.0, arrivals[i] - time.monotonic()))
                    prompt = requests[i].prompt_token_ids
                    timed = await self.timed(engine, prompt, max_tokens, f"{mode}-{i}")
                    timed.arrival = arrivals[i]
                    return timed

                if mode == "continuous":
                    return list(
                        await asyncio.gather(
                            *(one(i, requests[i].expected_output_len) for i in range(count))
                        )
                    )
                return await self._static_batches(one, arrivals, batch, requests)

            results[mode] = self.run(engine, work)

        def throughput(timed: list[Timed]) -> float:
            return len(timed) / (max(t.times[-1] for t in timed) - min(t.arrival for t in timed))

        latencies = {mode: sorted(t.latency for t in timed) for mode, timed in results.items()}
        plot = self.plot_cdf(
            "2-continuous-batching",
            f"Latency of {count} requests arriving at {rate:g}/s (batches of {batch})",
            latencies,
        )
        details = {
            f"{mode}_latency_{q}": _quantile(values, p)
            for mode, values in latencies.items()
            for q, p in (("p50", 0.5), ("p99", 0.99))
        }
        return [
            Step(
                "Continuous batching",
                "requests/s, staggered arrivals",
                "req/s",
                throughput(results["continuous"]),
                throughput(results["static"]),
                "higher",
                plot,
                details,
            ),
            Step(
                "Continuous batching",
                "p99 latency, staggered arrivals",
                "s",
                _quantile(latencies["continuous"], 0.99),
                _quantile(latencies["static"], 0.99),
                "lower",
                plot,
                details,
            ),
        ]

    @staticmethod
    async def _static_batches(
        one: Callable[[int, int], Coroutine[Any, Any, Timed]],
        arrivals: list[float],
        batch: int,
        requests: list[Any],
    ) -> list[Timed]:
        """Static batching as a batch-at-a-time generate loop does it: whoever has arrived when
        the previous batch ends (at least one, at most `batch`) starts together, every member
        computes as many tokens as the longest needs (the rows of one padded batch), and all
        are answered when it ends."""
        done: list[Timed] = []
        next_index = 0
        count = len(arrivals)
        while next_index < count:
            await asyncio.sleep(max(0.0, arrivals[next_index] - time.monotonic()))
            now = time.monotonic()
            members = [next_index]
            while (
                len(members) < batch
                and members[-1] + 1 < count
                and arrivals[members[-1] + 1] <= now
            ):
                members.append(members[-1] + 1)
            next_index = members[-1] + 1
            longest = max(requests[i].expected_output_len for i in members)
            outputs = await asyncio.gather(*(one(i, longest) for i in members))
            finish = max(o.times[-1] for o in outputs)
            for output in outputs:
                output.times[-1] = finish
            done += outputs
        return done

    def prefix_caching(self) -> Step:
        questions = 3 if self.quick else 8
        dataset = self.dataset(4)
        system_tokens = SYSTEM_PROMPT_TOKENS // 2 if self.quick else SYSTEM_PROMPT_TOKENS
        _, system = dataset.exact_text(system_tokens)
        asks = [dataset.exact_text(24)[1] for _ in range(questions)]
        ttfts: dict[str, list[float]] = {}
        for mode, enabled in (("on", True), ("off", False)):
            engine = self.engine(enable_prefix_caching=enabled)

            async def work(engine: Any = engine, mode: str = mode) -> list[float]:
                out = []
                for i, ask in enumerate(asks):
                    timed = await self.timed(engine, list(system) + ask, 1, f"prefix-{mode}-{i}")
                    out.append(timed.ttft)
                return out

            ttfts[mode] = self.run(engine, work)
        plot = self.plot_series(
            "3-prefix-caching",
            f"TTFT of questions after one {system_tokens}-token system prompt",
            "request",
            "TTFT, ms",
            {mode: [1000 * t for t in values] for mode, values in ttfts.items()},
        )
        # The first question computes the system prompt either way.
        return Step(
            "Prefix caching",
            f"TTFT, shared {system_tokens}-token system prompt",
            "ms",
            1000 * statistics.mean(ttfts["on"][1:]),
            1000 * statistics.mean(ttfts["off"][1:]),
            "lower",
            plot,
            {"first_request_ms": 1000 * ttfts["on"][0]},
        )

    def chunked_prefill(self) -> Step:
        streams = 4
        long_len = 384 if self.quick else 1800
        dataset = self.dataset(5)
        short = [dataset.exact_text(32)[1] for _ in range(streams)]
        _, long_prompt = dataset.exact_text(long_len)
        gaps: dict[str, list[float]] = {}
        for mode, enabled in (("on", True), ("off", False)):
            options: dict[str, Any] = {"enable_chunked_prefill": enabled}
            options["max_num_batched_tokens"] = 256 if enabled else MAX_MODEL_LEN
            engine = self.engine(**options)

            async def work(engine: Any = engine, mode: str = mode) -> list[float]:
                running = [
                    asyncio.ensure_future(
                        self.timed(engine, s, 60 if self.quick else 200, f"stream-{mode}-{i}")
                    )
                    for i, s in enumerate(short)
                ]
                await asyncio.sleep(1.0)  # the streams are decoding
                arrived = time.monotonic()
                long_request = await self.timed(engine, long_prompt, 1, f"long-{mode}")
                answered = long_request.times[-1]
                timed = await asyncio.gather(*running)
                # Gaps between the streams' tokens while the long prompt was being computed.
                return [
                    b - a
                    for t in timed
                    for a, b in zip(t.times, t.times[1:])
                    if b >= arrived and a <= answered
                ]

            gaps[mode] = self.run(engine, work)
        plot = self.plot_bars(
            "4-chunked-prefill",
            f"Running streams' inter-token latency while a {long_len}-token prompt arrives",
            "ms",
            {
                "chunked: worst gap": 1000 * max(gaps["on"]),
                "one step: worst gap": 1000 * max(gaps["off"]),
                "chunked: mean gap": 1000 * statistics.mean(gaps["on"]),
                "one step: mean gap": 1000 * statistics.mean(gaps["off"]),
            },
        )
        return Step(
            "Chunked prefill",
            f"worst inter-token gap during a {long_len}-token prefill",
            "ms",
            1000 * max(gaps["on"]),
            1000 * max(gaps["off"]),
            "lower",
            plot,
            {"mean_gap_on_ms": 1000 * statistics.mean(gaps["on"])},
        )

    def streaming(self) -> Step:
        from pagoda.sampling_params import RequestOutputKind

        tokens = 32 if self.quick else 128
        _, prompt = self.dataset(6).exact_text(32)
        engine = self.engine()

        async def work() -> tuple[float, float]:
            streamed = await self.timed(engine, prompt, tokens, "streamed")
            whole = await self.timed(
                engine, prompt, tokens, "whole", output_kind=RequestOutputKind.FINAL_ONLY
            )
            return streamed.ttft, whole.ttft

        first_words, whole = self.run(engine, work)
        plot = self.plot_bars(
            "5-streaming",
            f"When the first words of a {tokens}-token reply arrive",
            "ms",
            {"streamed": 1000 * first_words, "one response": 1000 * whole},
        )
        return Step(
            "Streaming",
            f"first words of a {tokens}-token reply",
            "ms",
            1000 * first_words,
            1000 * whole,
            "lower",
            plot,
        )

    def cpu_kernels(self) -> Step:
        tokens = 32 if self.quick else 128
        with_kernels = decode_speed(self.model, tokens)
        command = [sys.executable, "-m", "pagoda.benchmarks.tour", "--decode-probe", str(tokens)]
        if self.model is not None:
            command += ["--model", self.model]
        probe = subprocess.run(
            command,
            env={**os.environ, "PAGODA_CPU_KERNELS": "0"},
            capture_output=True,
            text=True,
            check=True,
        )
        plain = float(probe.stdout.strip().splitlines()[-1])
        plot = self.plot_bars(
            "6-cpu-kernels",
            "Single-stream decode",
            "tokens/s",
            {"compiled kernels": with_kernels, "plain PyTorch": plain},
        )
        return Step(
            "CPU kernels",
            "single-stream decode",
            "tok/s",
            with_kernels,
            plain,
            "higher",
            plot,
        )

    def speculative_decoding(self) -> Step:
        tokens = 48 if self.quick else 160
        prompt = self._tokenizer.encode(REPEATING_TEXT * 3)
        speeds = {}
        for mode, config in (
            ("on", {"method": "ngram", "num_speculative_tokens": 3, "prompt_lookup_max": 4}),
            ("off", None),
        ):
            engine = self.engine(speculative_config=config)

            async def work(engine: Any = engine, mode: str = mode) -> float:
                await self.timed(engine, prompt, 4, f"warm-{mode}")
                timed = await self.timed(engine, prompt, tokens, f"spec-{mode}")
                return (tokens - 1) / (timed.times[-1] - timed.times[0])

            speeds[mode] = self.run(engine, work)
        plot = self.plot_bars(
            "7-speculative-decoding",
            "Single-stream decode of a text that repeats itself",
            "tokens/s",
            {"n-gram speculation": speeds["on"], "plain decoding": speeds["off"]},
        )
        return Step(
            "Speculative decoding",
            "single-stream decode, repeating text",
            "tok/s",
            speeds["on"],
            speeds["off"],
            "higher",
            plot,
        )

    # --- plots --------------------------------------------------------------------------------

    def _figure(self, name: str, title: str) -> tuple[Any, Any, Path]:
        import matplotlib

        matplotlib.use("Agg")
        from matplotlib import pyplot

        figure, axes = pyplot.subplots(figsize=(6.4, 3.6), dpi=110)
        axes.set_title(title, fontsize=10)
        return figure, axes, self.output_dir / f"{name}.png"

    def _save(self, figure: Any, path: Path) -> str:
        figure.tight_layout()
        figure.savefig(path)
        from matplotlib import pyplot

        pyplot.close(figure)
        return path.name

    def plot_bars(self, name: str, title: str, unit: str, values: dict[str, float]) -> str:
        figure, axes, path = self._figure(name, title)
        bars = axes.barh(list(values), list(values.values()), color="#2f6fdf")
        axes.bar_label(bars, fmt="%.1f", fontsize=8, padding=3)
        axes.set_xlabel(unit)
        axes.invert_yaxis()
        return self._save(figure, path)

    def plot_cdf(self, name: str, title: str, series: dict[str, list[float]]) -> str:
        figure, axes, path = self._figure(name, title)
        for label, values in series.items():
            fractions = [(i + 1) / len(values) for i in range(len(values))]
            axes.step(values, fractions, where="post", label=label)
        axes.set_xlabel("latency, s")
        axes.set_ylabel("fraction of requests")
        axes.legend(fontsize=8)
        return self._save(figure, path)

    def plot_series(
        self, name: str, title: str, xlabel: str, ylabel: str, series: dict[str, list[float]]
    ) -> str:
        figure, axes, path = self._figure(name, title)
        for label, values in series.items():
            axes.plot(range(1, len(values) + 1), values, marker="o", label=label)
        axes.set_xlabel(xlabel)
        axes.set_ylabel(ylabel)
        axes.legend(fontsize=8)
        return self._save(figure, path)

    # --- the whole tour -----------------------------------------------------------------------

    def run_all(self) -> list[Step]:
        steps: list[Callable[[], Step | list[Step]]] = [
            self.paged_kv_cache,
            self.continuous_batching,
            self.prefix_caching,
            self.chunked_prefill,
            self.streaming,
            self.cpu_kernels,
            self.speculative_decoding,
        ]
        for step in tqdm(steps, desc="Tour", unit="step"):
            result = step()
            self.steps += result if isinstance(result, list) else [result]
        return self.steps


def _kv_bytes_per_token(engine: Any) -> int:
    from pagoda.config import EngineConfig

    config: EngineConfig = engine.config
    hf = config.model_config.hf_config
    heads = getattr(hf, "num_key_value_heads", None) or hf.num_attention_heads
    head_dim = getattr(hf, "head_dim", None) or hf.hidden_size // hf.num_attention_heads
    cache_dtype = config.cache_config.cache_dtype
    if cache_dtype == "auto":
        element = config.model_config.dtype.itemsize
    else:
        element = {"bfloat16": 2, "float16": 2, "float32": 4}.get(cache_dtype, 1)  # fp8: 1
    return int(2 * hf.num_hidden_layers * heads * head_dim * element)


def _quantile(values: list[float], fraction: float) -> float:
    ordered = sorted(values)
    index = min(len(ordered) - 1, max(0, round(fraction * (len(ordered) - 1))))
    return ordered[index]


def decode_speed(model: str | None, tokens: int) -> float:
    """Single-stream greedy decode, tokens/s after the first token (one warm-up request)."""
    tour = Tour(model, quick=True, output_dir=Path("."))
    engine = tour.engine()
    _, prompt = tour.dataset(7).exact_text(32)

    async def work() -> float:
        await Tour.timed(engine, prompt, 4, "warm")
        timed = await Tour.timed(engine, prompt, tokens, "decode")
        return (tokens - 1) / (timed.times[-1] - timed.times[0])

    return float(Tour.run(engine, work))


def format_table(steps: list[Step]) -> str:
    """The tour's results as a Markdown table."""
    rows = [
        "| Step | Measured | On | Off | Better by |",
        "|---|---|---|---|---|",
    ]
    for step in steps:
        rows.append(
            f"| {step.name} | {step.quantity} | {step.on:.1f} {step.unit} | "
            f"{step.off:.1f} {step.unit} | {step.gain:.2f}x |"
        )
    return "\n".join(rows)


def machine_line() -> str:
    """The CPU this ran on, with the vector flags that choose Pagoda's kernels."""
    from pagoda.cpu.features import cpu_features

    return f"{cpu_features().describe()}, {os.cpu_count()} CPUs ({platform.machine()})"


def main(args: argparse.Namespace) -> int:
    """`pagoda tour`: run every step, print the table, write the plots and tour.json."""
    if getattr(args, "decode_probe", None):
        print(decode_speed(args.model, int(args.decode_probe)))
        return 0
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        raise ValueError(
            "pagoda tour draws its plots with matplotlib: pip install matplotlib"
        ) from None
    output_dir = Path(args.output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    tour = Tour(args.model, args.quick, output_dir)
    started = time.perf_counter()
    steps = tour.run_all()
    table = format_table(steps)
    machine = machine_line()
    print(f"\nPagoda tour ({'quick' if args.quick else 'full'}) on {machine}\n")
    print(table)
    print(f"\nPlots and tour.json in {output_dir} ({time.perf_counter() - started:.0f} s)")
    (output_dir / "tour.json").write_text(
        json.dumps(
            {
                "machine": machine,
                "quick": bool(args.quick),
                "model": args.model,
                "steps": [{**asdict(s), "gain": s.gain} for s in steps],
            },
            indent=2,
        )
        + "\n"
    )
    (output_dir / "tour.md").write_text(table + "\n")
    return 0


def add_tour_parser(subparsers: Any) -> None:
    """`pagoda tour` and its flags (imports nothing heavy)."""
    parser = subparsers.add_parser(
        "tour",
        help="measure each optimisation of the engine on this machine, on and off",
        description="Walk through Pagoda's optimisations on the default model (or --model), "
        "each measured here with it on and off; prints a table and saves plots.",
    )
    parser.add_argument("--model", default=None, help="the model (default: the default model)")
    parser.add_argument("--quick", action="store_true", help="smaller runs of every step (CI)")
    parser.add_argument(
        "--output-dir", default="tour-results", help="where the plots and tour.json go"
    )
    parser.add_argument("--decode-probe", default=None, help=argparse.SUPPRESS)
    parser.set_defaults(func=main)


if __name__ == "__main__":
    _parser = argparse.ArgumentParser()
    _parser.add_argument("--model", default=None)
    _parser.add_argument("--decode-probe", default=None)
    sys.exit(main(_parser.parse_args()))
