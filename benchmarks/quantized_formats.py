"""The default model in every checkpoint format Pagoda reads: perplexity, weight memory, speed.

    python benchmarks/quantized_formats.py [--formats ...] [--skip-speed] [--out DIR]

The source is the default model's GGUF file (SmolLM2-135M-Instruct, Q8_0 / Q4_1 matrices), whose
values dequantized to float32 are the "float" model: an HF safetensors checkpoint written once to
the output directory (and a bfloat16 copy, the form most hub checkpoints take). Each quantized format is then written from those float values by
`tests.quantized_checkpoints` (round to nearest, groups of 64, float16 scales: the formats' file
layouts, not their quantizers' quality; a real GPTQ/AWQ run would lose less than round-to-nearest)
and measured the same way:

- perplexity of `benchmarks/data/perplexity.txt` (a fixed text of ~1,000 tokens) from
  `prompt_logprobs=0`, under the default numerics of this CPU;
- the bytes the linear layers hold (blocks, packed copies; the float32 embedding table aside);
- `pagoda bench throughput` (64 prompts, 128 in / 64 out) and `pagoda bench latency` (batch 1,
  128 in / 64 out), one format after another on the same machine.

Prints a table and writes `results.json` to the output directory (default ~/.cache/pagoda/
quantized-formats). Progress goes to stderr.
"""

from __future__ import annotations

import argparse
import json
import math
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

FORMATS = [
    "float32",
    "bfloat16",
    "gguf",
    "gptq-int8-channel",
    "gptq-int4-sym",
    "gptq-int4-asym",
    "awq-int4",
    "ct-w4a16-sym",
    "ct-w8a8-int8",
    "fp8-block",
]
GROUP = 64  # SmolLM2's 576 hidden features are not a multiple of 128


def log(message: str) -> None:
    print(f"[quantized-formats {time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def float_checkpoint(out: Path) -> tuple[Path, Path]:
    """(the default GGUF file, an HF float32 checkpoint of its values in `out`/float32)."""
    import torch
    from safetensors.torch import save_file

    from pagoda.loader.gguf import gguf_hf_config, iterate_gguf_weights
    from pagoda.loader.resolve import resolve_model
    from pagoda.tokenizer.gguf_tokenizer import gguf_tokenizer

    gguf_path = resolve_model(None).weights_file
    assert gguf_path is not None
    target = out / "float32"
    if (target / "model.safetensors").exists():
        return gguf_path, target
    target.mkdir(parents=True, exist_ok=True)
    log(f"writing the float32 checkpoint of {gguf_path.name} to {target}")
    config = gguf_hf_config(gguf_path).to_dict()
    config.update(architectures=["LlamaForCausalLM"], model_type="llama", torch_dtype="float32")
    tensors = {name: t.contiguous() for name, t in iterate_gguf_weights(gguf_path)}
    if config.get("tie_word_embeddings"):
        tensors.pop("lm_head.weight", None)
    save_file({k: v.to(torch.float32) for k, v in tensors.items()}, target / "model.safetensors")
    (target / "config.json").write_text(json.dumps(config, indent=2))
    gguf_tokenizer(gguf_path).save_pretrained(target)
    generation = {
        k: config[k] for k in ("bos_token_id", "eos_token_id") if config.get(k) is not None
    }
    (target / "generation_config.json").write_text(json.dumps(generation))
    return gguf_path, target


def bfloat16_checkpoint(float_dir: Path, target: Path) -> Path:
    """The float checkpoint rounded to bfloat16, as most checkpoints on the hub are stored."""
    import shutil

    import torch
    from safetensors.torch import load_file, save_file

    if (target / "model.safetensors").exists():
        return target
    log("writing bfloat16")
    shutil.copytree(float_dir, target, dirs_exist_ok=True)
    state = load_file(float_dir / "model.safetensors")
    save_file({k: v.to(torch.bfloat16) for k, v in state.items()}, target / "model.safetensors")
    config = json.loads((float_dir / "config.json").read_text())
    config["torch_dtype"] = config["dtype"] = "bfloat16"
    (target / "config.json").write_text(json.dumps(config, indent=2))
    return target


def checkpoint(fmt: str, out: Path, gguf_path: Path, float_dir: Path) -> Path:
    if fmt == "float32":
        return float_dir
    if fmt == "gguf":
        return gguf_path
    if fmt == "bfloat16":
        return bfloat16_checkpoint(float_dir, out / fmt)
    import tests.quantized_checkpoints as quantized

    target = out / fmt
    if not (target / "model.safetensors").exists():
        log(f"writing {fmt}")
        quantized.GROUP = GROUP
        quantized.quantize_checkpoint(float_dir, target, fmt)
    return target


def linear_bytes(model: Any) -> int:
    """Bytes the linear layers' weight methods hold (blocks, packed and decoder copies)."""
    return sum(
        module.method.held_bytes(module)
        for module in model.modules()
        if getattr(module, "method", None) is not None
    )


def perplexity(model_path: Path, text: str) -> dict[str, Any]:
    from pagoda import LLM, SamplingParams

    start = time.perf_counter()
    llm = LLM(str(model_path), max_model_len=2048, max_logprobs=1)
    load = time.perf_counter() - start
    runner = llm.llm_engine.engine_core.executor.worker.model_runner
    model = runner.model
    params = SamplingParams(max_tokens=1, prompt_logprobs=0, temperature=0.0)
    (output,) = llm.generate([text], params, use_tqdm=False)
    ids = output.prompt_token_ids
    assert ids is not None and output.prompt_logprobs is not None
    logprobs = [entry[token].logprob for token, entry in zip(ids[1:], output.prompt_logprobs[1:])]
    result = {
        "tokens": len(logprobs),
        "perplexity": math.exp(-sum(logprobs) / len(logprobs)),
        "linear_weight_mib": linear_bytes(model) / 2**20,
        # The LM head alone (tied to the embedding table: float16 in quantized checkpoints).
        "lm_head_mib": model.lm_head.method.held_bytes(model.lm_head) / 2**20,
        "load_seconds": load,
        "weight_plan": runner.weight_plan.reason,
        "decoder": runner.cpu_decoder is not None,
    }
    del llm
    return result


def speed(model_path: Path, out: Path, fmt: str) -> dict[str, Any]:
    results: dict[str, Any] = {}
    pagoda = [sys.executable, "-m", "pagoda.entrypoints.cli.main", "bench"]
    runs = {
        "throughput": [
            "throughput",
            "--num-prompts",
            "64",
            "--input-len",
            "128",
            "--output-len",
            "64",
        ],
        "latency": [
            "latency",
            "--batch-size",
            "1",
            "--input-len",
            "128",
            "--output-len",
            "64",
            "--num-iters-warmup",
            "1",
            "--num-iters",
            "3",
        ],
    }
    for name, arguments in runs.items():
        path = out / f"{fmt}-{name}.json"
        command = [
            *pagoda,
            *arguments,
            "--model",
            str(model_path),
            "--output-json",
            str(path),
            "--disable-tqdm",
        ]
        log(f"{fmt}: bench {name}")
        subprocess.run(command, check=True, stdout=subprocess.DEVNULL)
        results[name] = json.loads(path.read_text())
    return {
        "output_tok_s": results["throughput"]["output_tokens_per_second"],
        "total_tok_s": results["throughput"]["tokens_per_second"],
        "latency_s": results["latency"]["avg_latency"],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--formats", nargs="+", default=FORMATS, choices=FORMATS)
    parser.add_argument("--skip-speed", action="store_true")
    parser.add_argument("--out", type=Path, default=Path.home() / ".cache/pagoda/quantized-formats")
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    text = (REPO / "benchmarks/data/perplexity.txt").read_text()
    gguf_path, float_dir = float_checkpoint(args.out)
    results = args.out / "results.json"
    # Formats measured before (a partial rerun keeps them), re-measured ones replaced.
    rows: dict[str, Any] = json.loads(results.read_text()) if results.exists() else {}
    for fmt in args.formats:
        path = checkpoint(fmt, args.out, gguf_path, float_dir)
        log(f"{fmt}: perplexity")
        row = perplexity(path, text)
        if not args.skip_speed:
            row.update(speed(path, args.out, fmt))
        rows[fmt] = row
        results.write_text(json.dumps(rows, indent=2))
    print(
        "| format | perplexity | linear weights MiB (of which LM head) | out tok/s "
        "| batch-1 latency s | C decoder |"
    )
    print("|" + "---|" * 6)
    for fmt in [f for f in FORMATS if f in rows]:
        row = rows[fmt]
        print(
            f"| {fmt} | {row['perplexity']:.3f} | {row['linear_weight_mib']:.1f} "
            f"({row['lm_head_mib']:.1f}) | {row.get('output_tok_s', float('nan')):.1f} | "
            f"{row.get('latency_s', float('nan')):.3f} | {'yes' if row['decoder'] else 'no'} |"
        )


if __name__ == "__main__":
    main()
