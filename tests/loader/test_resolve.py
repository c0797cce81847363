"""Model resolution: local directories, GGUF files, an offline hub cache, the default model."""

from __future__ import annotations

from pathlib import Path

import pytest

from pagoda import LLM, SamplingParams
from pagoda.loader.resolve import DEFAULT_MODEL, DEFAULT_MODEL_FILE, resolve_model
from tests.tiny_llama import make_tiny_llama

REPO = "tiny-org/tiny-llama"


@pytest.fixture(scope="module")
def hub_cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A Hugging Face hub cache laid out by hand: `main` and `v1` point at different snapshots."""
    cache = tmp_path_factory.mktemp("hf-cache")
    repo = cache / ("models--" + REPO.replace("/", "--"))
    for ref, commit, seed in (("main", "a" * 40, 0), ("v1", "b" * 40, 1)):
        snapshot = repo / "snapshots" / commit
        make_tiny_llama(snapshot, seed=seed)
        (repo / "refs").mkdir(parents=True, exist_ok=True)
        (repo / "refs" / ref).write_text(commit)
    return cache


@pytest.fixture
def offline(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")


def test_local_hf_directory_resolves_to_itself(tmp_path: Path) -> None:
    model_dir = make_tiny_llama(tmp_path / "m")
    resolved = resolve_model(str(model_dir))
    assert resolved.path == model_dir and not resolved.is_gguf


def test_hub_id_resolves_from_an_offline_cache_with_revision(
    hub_cache: Path, offline: None
) -> None:
    main = resolve_model(REPO, download_dir=str(hub_cache))
    v1 = resolve_model(REPO, revision="v1", download_dir=str(hub_cache))
    assert main.path.name == "a" * 40
    assert v1.path.name == "b" * 40
    assert (v1.path / "config.json").is_file()


def test_llm_runs_a_hub_id_from_the_offline_cache(hub_cache: Path, offline: None) -> None:
    llm = LLM(REPO, download_dir=str(hub_cache), revision="v1")
    out = llm.generate("hello", SamplingParams(max_tokens=3, temperature=0), use_tqdm=False)
    assert len(out[0].outputs[0].token_ids) >= 1


def test_missing_hub_model_offline_names_the_model_and_the_cache(
    hub_cache: Path, offline: None
) -> None:
    with pytest.raises(FileNotFoundError) as info:
        resolve_model("tiny-org/absent", download_dir=str(hub_cache))
    message = str(info.value)
    assert "tiny-org/absent" in message and str(hub_cache) in message
    assert "HF_HUB_OFFLINE" in message
    with pytest.raises(FileNotFoundError, match="revision 'v9'"):
        resolve_model(REPO, revision="v9", download_dir=str(hub_cache))


def test_missing_local_path_is_a_clear_error() -> None:
    with pytest.raises(FileNotFoundError, match="no such file or directory"):
        resolve_model("./no/such/model")


def test_no_model_resolves_to_the_packaged_smollm2_gguf() -> None:
    resolved = resolve_model(None)
    assert resolved.name == DEFAULT_MODEL
    assert resolved.is_gguf and resolved.weights_file is not None
    assert resolved.weights_file.name == DEFAULT_MODEL_FILE
    assert resolved.hf_config.architectures == ["LlamaForCausalLM"]


def test_default_id_prefers_the_hub_cache_when_it_holds_the_model(
    tmp_path: Path, offline: None
) -> None:
    repo = tmp_path / ("models--" + DEFAULT_MODEL.replace("/", "--"))
    make_tiny_llama(repo / "snapshots" / ("c" * 40))
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text("c" * 40)
    assert resolve_model(DEFAULT_MODEL, download_dir=str(tmp_path)).path.name == "c" * 40
    # ...and falls back to the package when the cache does not.
    empty = tmp_path / "empty"
    empty.mkdir()
    assert resolve_model(DEFAULT_MODEL, download_dir=str(empty)).is_gguf


def test_directory_holding_one_gguf_resolves_to_that_file(tmp_path: Path) -> None:
    source = resolve_model(None).weights_file
    assert source is not None
    target = tmp_path / "model.gguf"
    target.symlink_to(source)
    resolved = resolve_model(str(tmp_path))
    assert resolved.weights_file == target


def _two_quantizations(directory: Path) -> Path:
    """A directory holding the default model's file under two quantization-type names."""
    source = resolve_model(None).weights_file
    assert source is not None
    directory.mkdir(parents=True, exist_ok=True)
    for name in ("SmolLM2-135M-Instruct-Q4_1.gguf", "SmolLM2-135M-Instruct.Q8_0.gguf"):
        (directory / name).symlink_to(source)
    return directory


def test_a_quant_type_suffix_picks_that_file_of_a_local_directory(tmp_path: Path) -> None:
    directory = _two_quantizations(tmp_path / "gguf")
    picked = resolve_model(f"{directory}:Q8_0")
    assert picked.weights_file == directory / "SmolLM2-135M-Instruct.Q8_0.gguf"
    assert resolve_model(f"{directory}:q4_1").weights_file == directory / (
        "SmolLM2-135M-Instruct-Q4_1.gguf"
    )
    with pytest.raises(FileNotFoundError, match=r"no \.gguf file of quantization type Q2_K.*Q4_1"):
        resolve_model(f"{directory}:Q2_K")
    with pytest.raises(ValueError, match=r"choose one by its quantization type"):
        resolve_model(str(directory))


def test_two_files_of_one_quant_type_are_refused_naming_both(tmp_path: Path) -> None:
    directory = _two_quantizations(tmp_path / "gguf")
    (directory / "other-Q8_0.gguf").symlink_to(directory / "SmolLM2-135M-Instruct.Q8_0.gguf")
    with pytest.raises(ValueError, match=r"2 \.gguf files of type Q8_0.*other-Q8_0\.gguf"):
        resolve_model(f"{directory}:Q8_0")


def test_a_hub_id_with_a_quant_type_resolves_to_that_file_from_the_cache(
    tmp_path: Path, offline: None
) -> None:
    repo = tmp_path / "cache" / "models--tiny-org--tiny-gguf"
    _two_quantizations(repo / "snapshots" / ("c" * 40))
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text("c" * 40)
    resolved = resolve_model("tiny-org/tiny-gguf:Q8_0", download_dir=str(tmp_path / "cache"))
    assert resolved.weights_file is not None
    assert resolved.weights_file.name == "SmolLM2-135M-Instruct.Q8_0.gguf"
    assert resolved.is_gguf and resolved.hf_config is not None
