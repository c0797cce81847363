"""`pagoda bench`: throughput, latency and serving benchmarks shaped like `vllm bench`.

Flag names, printed labels and JSON keys follow vLLM's, so a Pagoda run and a vLLM run compare
line by line. `cli.py` declares the flags (and `engine_args.py` the engine's) without importing
anything heavy; `datasets.py` makes random prompts of an exact token length; `throughput.py` and
`latency.py` drive the offline `LLM` in-process; `serve.py` is an asyncio client of any
OpenAI-compatible server (its HTTP side lives in `client.py`); `results.py` turns measurements
into vLLM's printed blocks and JSON files. Nothing here is imported by the engine itself.
"""
