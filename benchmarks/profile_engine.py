"""Profile the engine's step loop with torch.profiler on a fixed synthetic workload.

    python benchmarks/profile_engine.py --num-prompts 32 --input-len 256 --output-len 32 [--model M]
        [--quantization Q] [--kv-cache-dtype auto|bfloat16|float32] [--trace out.json]

Prints the wall time of prefill and decode steps separately and the top operators by self CPU time,
so a change to the hot path can be predicted and then checked against the same table.
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import torch


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", default=None)
    parser.add_argument("--num-prompts", type=int, default=32)
    parser.add_argument("--input-len", type=int, default=256)
    parser.add_argument("--output-len", type=int, default=32)
    parser.add_argument("--quantization", default=None)
    parser.add_argument("--dtype", default="auto")
    parser.add_argument("--kv-cache-dtype", default="auto")
    parser.add_argument("--rows", type=int, default=25)
    parser.add_argument("--trace", default=None)
    parser.add_argument(
        "--cprofile", action="store_true", help="Python-level profile (cProfile) instead"
    )
    parser.add_argument(
        "--decode-only", action="store_true", help="profile only the steps after the prefills"
    )
    args = parser.parse_args()

    from pagoda.config import EngineArgs
    from pagoda.engine.llm_engine import LLMEngine
    from pagoda.sampling_params import SamplingParams

    engine_kwargs = {"dtype": args.dtype, "kv_cache_dtype": args.kv_cache_dtype}
    if args.model:
        engine_kwargs["model"] = args.model
    if args.quantization:
        engine_kwargs["quantization"] = args.quantization
    engine = LLMEngine.from_engine_args(EngineArgs(**engine_kwargs))
    rng = np.random.default_rng(0)
    vocab = engine.tokenizer.vocab_size
    params = SamplingParams(max_tokens=args.output_len, ignore_eos=True, temperature=0)

    def add_requests(tag: str) -> None:
        for i in range(args.num_prompts):
            ids = rng.integers(100, vocab - 100, size=args.input_len).tolist()
            engine.add_request(f"{tag}-{i}", {"prompt_token_ids": ids}, params)

    executor = engine.engine_core.executor
    execute = executor.execute_model
    last_plan = []

    def recording_execute(plan):  # type: ignore[no-untyped-def]
        last_plan.append(plan)
        return execute(plan)

    executor.execute_model = recording_execute

    def run(stop_at_first_decode: bool = False) -> tuple[list[float], list[float]]:
        prefill, decode = [], []
        while engine.has_unfinished_requests():
            start = time.perf_counter()
            engine.step()
            elapsed = time.perf_counter() - start
            plan = last_plan.pop()
            is_decode = all(len(s.token_ids) == 1 for s in plan.scheduled)
            (decode if is_decode else prefill).append(elapsed)
            if is_decode and stop_at_first_decode:
                break
        return prefill, decode

    add_requests("warmup")
    run()
    add_requests("run")
    if args.decode_only:
        run(stop_at_first_decode=True)
    if args.cprofile:
        import cProfile
        import pstats

        profiler = cProfile.Profile()
        profiler.enable()
        prefill, decode = run()
        profiler.disable()
        print(
            f"prefill steps: {len(prefill)}, {sum(prefill):.2f} s; decode steps: {len(decode)}, "
            f"mean {1e3 * np.mean(decode):.1f} ms, median {1e3 * np.median(decode):.1f} ms"
        )
        pstats.Stats(profiler).sort_stats("tottime").print_stats(args.rows)
        return
    activities = [torch.profiler.ProfilerActivity.CPU]
    with torch.profiler.profile(activities=activities) as prof:
        prefill, decode = run()
    print(
        f"prefill steps: {len(prefill)}, {sum(prefill):.2f} s; decode steps: {len(decode)}, "
        f"mean {1e3 * np.mean(decode):.1f} ms, median {1e3 * np.median(decode):.1f} ms"
    )
    print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=args.rows))
    if args.trace:
        prof.export_chrome_trace(args.trace)


if __name__ == "__main__":
    main()
