"""`pagoda bench throughput`: offline throughput of the in-process engine, as `vllm bench throughput`.

Every prompt is queued at once on a `pagoda.LLM` and the engine runs until all finish, so the
figure is what continuous batching sustains with a full queue. Requests ignore EOS, so each one
produces exactly its output length; the model load and the prompt generation are not timed.
"""

from __future__ import annotations

import argparse
import time

from pagoda.benchmarks.datasets import RandomDataset
from pagoda.benchmarks.engine_args import engine_kwargs
from pagoda.benchmarks.results import format_throughput, throughput_json, write_json


def main(args: argparse.Namespace) -> int:
    """Run the benchmark described by `args`; returns the exit status."""
    from pagoda import LLM, SamplingParams

    llm = LLM(args.model, **engine_kwargs(args))
    dataset = RandomDataset(llm.get_tokenizer(), seed=args.seed)
    requests = dataset.sample(
        args.num_prompts,
        args.input_len,
        args.output_len,
        range_ratio=args.random_range_ratio,
        prefix_len=args.random_prefix_len,
    )
    prompts = [{"prompt": r.prompt, "prompt_token_ids": r.prompt_token_ids} for r in requests]
    params = [
        SamplingParams(
            n=1,
            temperature=1.0,
            top_p=1.0,
            ignore_eos=True,
            max_tokens=r.expected_output_len,
            detokenize=not args.disable_detokenize,
        )
        for r in requests
    ]
    start = time.perf_counter()
    outputs = llm.generate(prompts, params, use_tqdm=not args.disable_tqdm)
    elapsed = time.perf_counter() - start

    prompt_tokens = sum(len(o.prompt_token_ids or []) for o in outputs)
    output_tokens = sum(len(c.token_ids) for o in outputs for c in o.outputs)
    print(format_throughput(len(outputs), prompt_tokens, output_tokens, elapsed))
    if args.output_json:
        write_json(
            args.output_json, throughput_json(len(outputs), prompt_tokens, output_tokens, elapsed)
        )
    return 0
