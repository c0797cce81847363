"""Read a Hugging Face safetensors checkpoint as a stream of `(hf_name, tensor)` pairs.

This is the source the model loader feeds into `model.load_weights`. Tensors are read one at a
time (memory-mapped), so a checkpoint never has to fit in host memory twice.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import torch
from safetensors import safe_open
from tqdm.auto import tqdm

INDEX_FILE = "model.safetensors.index.json"


def safetensors_files(model_dir: str | Path) -> list[Path]:
    """The checkpoint files of `model_dir`, in load order.

    With `model.safetensors.index.json`, the files its weight_map names; otherwise every
    `*.safetensors` file, sorted.

    Raises:
        FileNotFoundError: the directory has no safetensors weights, or the index names a missing file.
    """
    directory = Path(model_dir)
    index_path = directory / INDEX_FILE
    if index_path.is_file():
        weight_map: dict[str, str] = json.loads(index_path.read_text())["weight_map"]
        files = [directory / name for name in sorted(set(weight_map.values()))]
        missing = [str(path) for path in files if not path.is_file()]
        if missing:
            raise FileNotFoundError(
                f"{index_path} names missing weight files: {', '.join(missing)}"
            )
        return files
    files = sorted(directory.glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(f"no *.safetensors weights found in {directory}")
    return files


def iterate_safetensors(model_dir: str | Path) -> Iterator[tuple[str, torch.Tensor]]:
    """Yield `(name, tensor)` for every tensor of the checkpoint in `model_dir`, on the CPU, in the
    checkpoint's dtype, with a "Loading safetensors" progress bar.

    Raises:
        FileNotFoundError: as `safetensors_files`.
    """
    files = safetensors_files(model_dir)
    # Reading the headers first is cheap and gives the bar a true total.
    names_per_file: list[list[str]] = []
    for path in files:
        with safe_open(str(path), framework="pt") as handle:
            names_per_file.append(list(handle.keys()))
    total = sum(len(names) for names in names_per_file)
    with tqdm(total=total, desc="Loading safetensors", unit="tensor") as progress:
        for path, names in zip(files, names_per_file, strict=True):
            progress.set_postfix_str(path.name)
            with safe_open(str(path), framework="pt") as handle:
                for name in names:
                    yield name, handle.get_tensor(name)
                    progress.update(1)
