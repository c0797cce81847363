"""`pagoda bench serve`: load-test any OpenAI-compatible server, as `vllm bench serve` does.

The run: pick the model (the first one `/v1/models` lists unless `--model` names one) and its
tokenizer, make random prompts of exact token lengths, check with one request that the server
answers, then send every prompt as a streamed request. Requests arrive all at once
(`--request-rate inf`) or as a Poisson (or, with `--burstiness`, gamma) process, and at most
`--max-concurrency` are in flight. The result block, its labels and the saved JSON keys are
vLLM's, so the same scripts read a Pagoda run and a vLLM run.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import time
import uuid
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

import httpx
import numpy as np
from tqdm.auto import tqdm

from pagoda import envs
from pagoda.benchmarks.cli import DEFAULT_ENDPOINTS, SAMPLING_FLAGS
from pagoda.benchmarks.client import REQUEST_TIMEOUT_S, RequestInput, send_request
from pagoda.benchmarks.datasets import RandomDataset, SampleRequest, load_custom_dataset
from pagoda.benchmarks.results import (
    SERVE_METRICS,
    RequestOutcome,
    compute_serve_metrics,
    format_serve_result,
    serve_result_json,
    write_json,
)

_GOODPUT_METRICS = ("ttft", "tpot", "e2el")


@dataclass(frozen=True, slots=True)
class _Settings:
    """The flags that need parsing beyond argparse, parsed once."""

    selected_metrics: list[str]
    percentiles: list[float]
    goodput: dict[str, float] | None
    headers: dict[str, str]
    metadata: dict[str, str]
    extra_body: dict[str, Any]


def main(args: argparse.Namespace) -> int:
    """Run the benchmark; returns 0, or 1 when no request succeeded."""
    settings = _validate(args)
    return asyncio.run(_run(args, settings))


def _validate(args: argparse.Namespace) -> _Settings:
    """Check the flags once, at the edge; returns the parsed composite values."""
    if args.num_prompts < 1:
        raise ValueError(f"--num-prompts must be >= 1, got {args.num_prompts}")
    if not args.request_rate > 0:
        raise ValueError(f"--request-rate must be > 0 (or inf), got {args.request_rate}")
    if not args.burstiness > 0:
        raise ValueError(f"--burstiness must be > 0, got {args.burstiness}")
    if args.max_concurrency is not None and args.max_concurrency < 1:
        raise ValueError(f"--max-concurrency must be >= 1, got {args.max_concurrency}")
    if args.dataset_name == "custom" and not args.dataset_path:
        raise ValueError("--dataset-name custom needs --dataset-path (a JSONL file of prompts)")
    if args.num_warmups < 0:
        raise ValueError(f"--num-warmups must be >= 0, got {args.num_warmups}")
    selected = [m.strip() for m in args.percentile_metrics.split(",") if m.strip()]
    unknown = [m for m in selected if m not in SERVE_METRICS]
    if unknown:
        raise ValueError(
            f"--percentile-metrics must name metrics from {', '.join(SERVE_METRICS)}; "
            f"got {', '.join(unknown)}"
        )
    try:
        percentiles = [float(p) for p in args.metric_percentiles.split(",") if p.strip()]
    except ValueError:
        raise ValueError(
            f"--metric-percentiles must be comma-separated numbers, got {args.metric_percentiles!r}"
        ) from None
    if not all(0 < p <= 100 for p in percentiles):
        raise ValueError(f"--metric-percentiles must be in (0, 100], got {args.metric_percentiles}")
    extra_body: dict[str, Any] = {}
    if args.extra_body:
        extra_body = json.loads(args.extra_body)
        if not isinstance(extra_body, dict):
            raise ValueError(f"--extra-body must be a JSON object, got {args.extra_body!r}")
    return _Settings(
        selected_metrics=selected,
        percentiles=percentiles,
        goodput=_parse_goodput(args.goodput),
        headers=_parse_pairs(args.header, "--header"),
        metadata=_parse_pairs(args.metadata, "--metadata"),
        extra_body=extra_body,
    )


def _parse_pairs(items: Sequence[str] | None, flag: str) -> dict[str, str]:
    pairs = {}
    for item in items or []:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise ValueError(f"{flag} takes KEY=VALUE pairs, got {item!r}")
        pairs[key.strip()] = value.strip()
    return pairs


def _parse_goodput(items: Sequence[str] | None) -> dict[str, float] | None:
    if not items:
        return None
    slos = {}
    for item in items:
        key, sep, value = item.partition(":")
        if not sep or key not in _GOODPUT_METRICS:
            raise ValueError(
                f"--goodput takes KEY:MS with KEY one of {', '.join(_GOODPUT_METRICS)}; "
                f"got {item!r}"
            )
        try:
            bound = float(value)
        except ValueError:
            raise ValueError(f"--goodput {key}: {value!r} is not a number of ms") from None
        if bound < 0:
            raise ValueError(f"--goodput {key} must be >= 0 ms, got {bound}")
        slos[key] = bound
    return slos


async def _run(args: argparse.Namespace, settings: _Settings) -> int:
    base_url, api_url = _urls(args)
    headers = dict(settings.headers)
    api_key = args.api_key or envs.get_str("OPENAI_API_KEY")
    if api_key:
        headers.setdefault("Authorization", f"Bearer {api_key}")
    connections = min(args.max_concurrency or args.num_prompts, args.num_prompts)
    limits = httpx.Limits(max_connections=connections, max_keepalive_connections=connections)
    async with httpx.AsyncClient(timeout=REQUEST_TIMEOUT_S, limits=limits) as client:
        model, tokenizer_candidates = await _pick_model(client, args, base_url, headers)
        tokenizer_id, tokenizer = load_tokenizer(tokenizer_candidates)
        if args.dataset_name == "custom":
            samples = load_custom_dataset(
                args.dataset_path, tokenizer, args.num_prompts, args.custom_output_len
            )
        else:
            samples = RandomDataset(tokenizer, seed=args.seed).sample(
                args.num_prompts,
                args.random_input_len,
                args.random_output_len,
                range_ratio=args.random_range_ratio,
                prefix_len=args.random_prefix_len,
            )
        prefix = args.request_id_prefix or f"bench-{uuid.uuid4().hex[:8]}-"
        sampling = {"temperature": 0.0 if args.temperature is None else args.temperature}
        for name in SAMPLING_FLAGS:
            if getattr(args, name) is not None:
                sampling[name] = getattr(args, name)
        sampling.update(settings.extra_body)

        def make_input(sample: SampleRequest, request_id: str) -> RequestInput:
            return RequestInput(
                backend=args.backend,
                api_url=api_url,
                model=args.served_model_name or model,
                prompt=sample.prompt,
                prompt_len=sample.prompt_len,
                output_len=sample.expected_output_len,
                request_id=request_id,
                ignore_eos=args.ignore_eos,
                sampling=sampling,
                headers=headers,
            )

        await _ready_check(client, make_input(samples[0], f"{prefix}test"), args)
        if args.num_warmups:
            print(f"Warming up with {args.num_warmups} requests...")
            warmups = [
                make_input(samples[i % len(samples)], f"{prefix}warmup-{i}")
                for i in range(args.num_warmups)
            ]
            await _send_all(client, warmups, math.inf, 1.0, args.max_concurrency, args.seed, None)

        rate = args.request_rate
        print(f"Traffic request rate: {rate if math.isfinite(rate) else 'inf'}")
        kind = "Poisson process" if args.burstiness == 1.0 else "Gamma distribution"
        print(f"Burstiness factor: {args.burstiness} ({kind})")
        print(f"Maximum request concurrency: {args.max_concurrency}")
        print("Starting main benchmark run...")
        inputs = [make_input(sample, f"{prefix}{i}") for i, sample in enumerate(samples)]
        bar = tqdm(total=len(inputs), disable=args.disable_tqdm)
        start = time.perf_counter()
        outcomes = await _send_all(
            client, inputs, rate, args.burstiness, args.max_concurrency, args.seed, bar
        )
        duration = time.perf_counter() - start
        bar.close()

    count_missing_output_tokens(outcomes, tokenizer)
    metrics = compute_serve_metrics(outcomes, duration, settings.percentiles, settings.goodput)
    if metrics.completed == 0:
        first_error = next((o.error for o in outcomes if o.error), "")
        print(f"WARNING: all requests failed (first error: {first_error})")
    print(format_serve_result(metrics, args.max_concurrency, rate, settings.selected_metrics))
    if args.save_result or args.save_detailed:
        result = {
            "date": datetime.now().strftime("%Y%m%d-%H%M%S"),
            "endpoint_type": args.backend,
            "backend": args.backend,
            "label": args.label,
            "model_id": model,
            "tokenizer_id": tokenizer_id,
            "num_prompts": args.num_prompts,
            "request_rate": rate if math.isfinite(rate) else "inf",
            "burstiness": args.burstiness,
            "max_concurrency": args.max_concurrency,
            **settings.metadata,
            **serve_result_json(metrics, outcomes, detailed=args.save_detailed),
        }
        path = write_json(_result_path(args, model, result["date"]), result)
        print(f"Result saved to {path}")
    return 0 if metrics.completed else 1


def _urls(args: argparse.Namespace) -> tuple[str, str]:
    base_url = (args.base_url or f"http://{args.host}:{args.port}").rstrip("/")
    endpoint = args.endpoint or DEFAULT_ENDPOINTS[args.backend]
    if not endpoint.startswith("/"):
        endpoint = "/" + endpoint
    # NOTE: OpenAI clients are configured with ".../v1"; accept that form of --base-url too.
    if base_url.endswith("/v1") and endpoint.startswith("/v1/"):
        base_url = base_url[: -len("/v1")]
    return base_url, base_url + endpoint


async def _pick_model(
    client: httpx.AsyncClient, args: argparse.Namespace, base_url: str, headers: dict[str, str]
) -> tuple[str, list[str]]:
    """The model to benchmark, and where its tokenizer may be found, best first."""
    if args.model:
        return args.model, [args.tokenizer or args.model]
    url = f"{base_url}/v1/models"
    try:
        reply = await client.get(url, headers=headers, timeout=30)
        reply.raise_for_status()
        cards = reply.json().get("data") or []
    except (httpx.HTTPError, ValueError) as exc:
        raise ValueError(f"cannot list the models at {url} ({exc}); pass --model") from None
    if not cards:
        raise ValueError(f"the server at {base_url} lists no model; pass --model")
    model = str(cards[0]["id"])
    print(f"Using model: {model}")
    if args.tokenizer:
        return model, [args.tokenizer]
    # The card's `root` is the path or id the server loaded (for Pagoda and vLLM), which finds the
    # tokenizer even when the served name is an alias.
    root = cards[0].get("root")
    candidates = [str(root), model] if root and root != model else [model]
    return model, candidates


def load_tokenizer(candidates: Sequence[str]) -> tuple[str, Any]:
    """The first tokenizer that loads from `candidates`, with Pagoda's model resolution.

    A name is resolved like `pagoda serve`'s model argument (a directory, a .gguf file, a hub id,
    the packaged default model); a directory holding only tokenizer files works too. Raises
    ValueError naming every candidate when none loads.
    """
    from pagoda.loader.resolve import resolve_model
    from pagoda.tokenizer import get_tokenizer

    errors = []
    for name in candidates:
        try:
            return name, get_tokenizer(resolve_model(name).tokenizer_path)
        except Exception as exc:
            # Any candidate may fail (an alias that is no hub id, a directory without config.json);
            # the next one is tried, and every reason is reported if none loads.
            if Path(name).expanduser().is_dir():
                try:
                    return name, get_tokenizer(Path(name).expanduser())
                except ValueError:
                    pass
            errors.append(f"{name}: {exc}")
    raise ValueError(f"no tokenizer could be loaded ({'; '.join(errors)}); pass --tokenizer")


async def _ready_check(client: httpx.AsyncClient, test: RequestInput, args: Any) -> None:
    """Send one request until it succeeds or the timeout passes; warn, never stop, on failure."""
    timeout = args.ready_check_timeout_sec
    if timeout <= 0:
        return
    print("Starting initial single prompt test run...")
    deadline = time.monotonic() + timeout
    while True:
        outcome = await send_request(client, test)
        if outcome.success:
            print("Initial test run completed.")
            return
        # Only a server that cannot be reached yet is worth waiting for; an HTTP error (a wrong
        # model name, a prompt too long) will not change, and the run will count it as failed.
        unreachable = not outcome.error.startswith(("HTTP ", "error event"))
        if not unreachable or time.monotonic() >= deadline:
            print(f"WARNING: initial test run failed: {outcome.error}")
            return
        await asyncio.sleep(1.0)


async def _arrivals(
    inputs: Sequence[RequestInput], rate: float, burstiness: float, seed: int
) -> AsyncIterator[RequestInput]:
    """Yield requests at their arrival times: all at once, or with gamma-distributed gaps."""
    rng = np.random.default_rng(seed)
    for index, request in enumerate(inputs):
        yield request
        if math.isfinite(rate) and index + 1 < len(inputs):
            # Gamma with shape k and scale 1 / (rate * k) has mean 1 / rate; k = 1 is Poisson.
            await asyncio.sleep(float(rng.gamma(shape=burstiness, scale=1.0 / (rate * burstiness))))


async def _send_all(
    client: httpx.AsyncClient,
    inputs: Sequence[RequestInput],
    rate: float,
    burstiness: float,
    max_concurrency: int | None,
    seed: int,
    bar: Any,
) -> list[RequestOutcome]:
    limit = asyncio.Semaphore(max_concurrency or len(inputs))

    async def send(request: RequestInput) -> RequestOutcome:
        async with limit:
            outcome = await send_request(client, request)
        if bar is not None:
            bar.update(1)
        return outcome

    tasks = [asyncio.create_task(send(r)) async for r in _arrivals(inputs, rate, burstiness, seed)]
    return list(await asyncio.gather(*tasks))


def count_missing_output_tokens(outcomes: Sequence[RequestOutcome], tokenizer: Any) -> None:
    """Fill in output counts the server did not report (no usage event) by tokenizing the text."""
    for outcome in outcomes:
        if outcome.success and outcome.output_tokens == 0 and outcome.generated_text:
            outcome.output_tokens = len(
                tokenizer.encode(outcome.generated_text, add_special_tokens=False)
            )


def _result_path(args: argparse.Namespace, model: str, date: str) -> Path:
    if args.result_filename:
        name = args.result_filename
    else:
        rate = args.request_rate if math.isfinite(args.request_rate) else "inf"
        concurrency = f"-concurrency{args.max_concurrency}" if args.max_concurrency else ""
        base_model = model.rstrip("/").split("/")[-1]
        name = f"{args.label or args.backend}-{rate}qps{concurrency}-{base_model}-{date}.json"
    return Path(args.result_dir or ".") / name
