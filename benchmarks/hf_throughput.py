"""Hugging Face transformers as a peer for `pagoda bench throughput`: the same offline workload
(random prompts of an exact token length, a fixed number of output tokens, EOS ignored) run through
`model.generate` in batches, printed in the same three figures.

    python benchmarks/hf_throughput.py --model DIR [--gguf-file NAME] --input-len 256 \
        --output-len 128 --num-prompts 256 --batch-size 256 --device cuda --dtype float16

Prompts are random token ids, as `pagoda bench throughput --dataset-name random` draws them; every
prompt has the same length, so batches need no padding. Greedy decoding, transformers' own KV cache.
It is `../shared/peers/hf_baseline.py` (the CPU baseline of workload B) with a device, GGUF files,
several batches and a JSON result, for the GPU runs in BENCHMARKS.md.
"""

from __future__ import annotations

import argparse
import json
import time

import torch
from tqdm import tqdm
from transformers import AutoModelForCausalLM

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", required=True, help="a Hugging Face directory")
    parser.add_argument("--gguf-file", default=None, help="a GGUF file's name inside --model")
    parser.add_argument("--input-len", type=int, default=256)
    parser.add_argument("--output-len", type=int, default=128)
    parser.add_argument("--num-prompts", type=int, default=256)
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="float16")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--output-json", default=None)
    args = parser.parse_args()

    kwargs = {"gguf_file": args.gguf_file} if args.gguf_file else {}
    model = AutoModelForCausalLM.from_pretrained(args.model, dtype=DTYPES[args.dtype], **kwargs)
    model = model.to(args.device).eval()
    vocab = model.config.vocab_size
    generator = torch.Generator().manual_seed(args.seed)
    prompts = torch.randint(0, vocab, (args.num_prompts, args.input_len), generator=generator)

    def run(batch: torch.Tensor) -> None:
        ids = batch.to(args.device)
        out = model.generate(
            input_ids=ids,
            attention_mask=torch.ones_like(ids),
            max_new_tokens=args.output_len,
            min_new_tokens=args.output_len,
            do_sample=False,
            pad_token_id=0,
        )
        assert out.shape[1] == args.input_len + args.output_len

    with torch.no_grad():
        run(prompts[: min(2, args.num_prompts)])  # warm-up: kernels, allocator
        if args.device.startswith("cuda"):
            torch.cuda.synchronize()
        start = time.perf_counter()
        for first in tqdm(range(0, args.num_prompts, args.batch_size), desc="batches"):
            run(prompts[first : first + args.batch_size])
        if args.device.startswith("cuda"):
            torch.cuda.synchronize()
        elapsed = time.perf_counter() - start

    total = args.num_prompts * (args.input_len + args.output_len)
    output = args.num_prompts * args.output_len
    print(
        f"Throughput: {args.num_prompts / elapsed:.2f} requests/s, {total / elapsed:.2f} total "
        f"tokens/s, {output / elapsed:.2f} output tokens/s"
    )
    if args.output_json:
        result = {
            "elapsed_time": elapsed,
            "num_requests": args.num_prompts,
            "total_num_tokens": total,
            "requests_per_second": args.num_prompts / elapsed,
            "tokens_per_second": total / elapsed,
            "output_tokens_per_second": output / elapsed,
            "batch_size": args.batch_size,
            "dtype": args.dtype,
            "device": args.device,
        }
        with open(args.output_json, "w") as f:
            json.dump(result, f, indent=2)


if __name__ == "__main__":
    main()
