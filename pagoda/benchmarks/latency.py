"""`pagoda bench latency`: time to finish one batch end to end, as `vllm bench latency`.

One batch of `--batch-size` prompts of `--input-len` tokens generates `--output-len` tokens each
(EOS ignored), `--num-iters-warmup` times untimed and then `--num-iters` times timed. Like vLLM,
every iteration sends the same prompts, so with prefix caching on (the default) the later
iterations reuse the cached prompt blocks; `--no-enable-prefix-caching` times the full prefill.
"""

from __future__ import annotations

import argparse
import time

from tqdm.auto import tqdm

from pagoda.benchmarks.datasets import RandomDataset
from pagoda.benchmarks.engine_args import engine_kwargs
from pagoda.benchmarks.results import format_latency, latency_json, write_json


def main(args: argparse.Namespace) -> int:
    """Run the benchmark described by `args`; returns the exit status."""
    from pagoda import LLM, SamplingParams

    if args.num_iters < 1:
        raise ValueError(f"--num-iters must be >= 1, got {args.num_iters}")
    if args.num_iters_warmup < 0:
        raise ValueError(f"--num-iters-warmup must be >= 0, got {args.num_iters_warmup}")
    llm = LLM(args.model, **engine_kwargs(args))
    dataset = RandomDataset(llm.get_tokenizer(), seed=args.seed)
    requests = dataset.sample(args.batch_size, args.input_len, args.output_len)
    prompts = [{"prompt_token_ids": r.prompt_token_ids} for r in requests]
    params = SamplingParams(
        n=1,
        temperature=1.0,
        top_p=1.0,
        ignore_eos=True,
        max_tokens=args.output_len,
        detokenize=not args.disable_detokenize,
    )

    def run_batch() -> float:
        start = time.perf_counter()
        llm.generate(prompts, params, use_tqdm=False)
        return time.perf_counter() - start

    print(f"Warming up ({args.num_iters_warmup} iterations)...")
    for _ in tqdm(
        range(args.num_iters_warmup), desc="Warmup iterations", disable=args.disable_tqdm
    ):
        run_batch()
    latencies = [
        run_batch()
        for _ in tqdm(range(args.num_iters), desc="Profiling iterations", disable=args.disable_tqdm)
    ]
    print(format_latency(latencies))
    if args.output_json:
        write_json(args.output_json, latency_json(latencies))
    return 0
