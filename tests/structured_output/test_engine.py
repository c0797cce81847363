"""Structured output through the engine (`LLM`): every constraint kind on the default model, on a
random-weight model, with n > 1, a prefix-cache hit, preemption, both backends; outputs always
parse and validate (jsonschema is the checker), and a grammar that cannot finish ends at
max_tokens with finish_reason "length"."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import jsonschema
import pytest

from pagoda import LLM, SamplingParams, StructuredOutputsParams

PERSON = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 20},
        "age": {"type": "integer", "minimum": 0, "maximum": 150},
        "tags": {"type": "array", "items": {"type": "string", "maxLength": 10}, "maxItems": 3},
    },
    "required": ["name", "age"],
    "additionalProperties": False,
}
PHONE = r"\d{3}-\d{4}"
CHOICES = ["yes", "no", "maybe"]
EBNF = 'root ::= animal " and " animal\nanimal ::= "cat" | "dog" | "bird"'
LARK = 'start: NUMBER ("," NUMBER)*\nNUMBER: /[0-9]{1,3}/'


def _check(kind: str, text: str) -> None:
    """Raise unless `text` satisfies the constraint of `kind` (as in CASES)."""
    if kind == "json":
        jsonschema.validate(json.loads(text), PERSON)
    elif kind == "json_object":
        assert isinstance(json.loads(text), dict)
    elif kind == "regex":
        assert re.fullmatch(PHONE, text), text
    elif kind == "choice":
        assert text in CHOICES, text
    elif kind == "grammar":
        assert re.fullmatch(r"(cat|dog|bird) and (cat|dog|bird)", text), text
    else:
        assert re.fullmatch(r"[0-9]{1,3}(,[0-9]{1,3})*", text), text


CASES: list[tuple[str, str, dict[str, Any]]] = [
    ("json", "Describe a person as JSON:", {"json": PERSON}),
    ("json_object", "Give me a JSON object:", {"json_object": True}),
    ("regex", "My phone number is", {"regex": PHONE}),
    ("choice", "Is the sky green? Answer:", {"choice": CHOICES}),
    ("grammar", "Two animals:", {"grammar": EBNF}),
]


def _params(fields: dict[str, Any], **kwargs: Any) -> SamplingParams:
    kwargs.setdefault("temperature", 0.0)
    kwargs.setdefault("max_tokens", 80)
    return SamplingParams(structured_outputs=StructuredOutputsParams(**fields), **kwargs)


@pytest.fixture(scope="module")
def llm() -> LLM:
    return LLM()


def test_every_kind_constrains_the_default_model(llm: LLM) -> None:
    outputs = llm.generate(
        [prompt for _, prompt, _ in CASES], [_params(f) for _, _, f in CASES], use_tqdm=False
    )
    for (kind, _, _), output in zip(CASES, outputs):
        completion = output.outputs[0]
        _check(kind, completion.text)
        assert completion.finish_reason == "stop"
    # Beside unconstrained requests in the same steps, which stay unconstrained.
    free = SamplingParams(temperature=0.0, max_tokens=8)
    mixed = llm.generate(
        ["The capital of France is", CASES[2][1]], [free, _params(CASES[2][2])], use_tqdm=False
    )
    assert (
        mixed[0].outputs[0].text
        == llm.generate(["The capital of France is"], free)[0].outputs[0].text
    )
    _check("regex", mixed[1].outputs[0].text)


def test_sampled_outputs_n_gt_1_and_a_prefix_cache_hit_stay_valid(llm: LLM) -> None:
    prompt = "Describe a person as JSON. " * 8  # several full blocks, cached the second time
    params = _params({"json": PERSON}, temperature=1.0, n=3, seed=7, max_tokens=120)
    for attempt in range(2):
        (output,) = llm.generate([prompt], params, use_tqdm=False)
        assert len(output.outputs) == 3
        assert any(c.finish_reason == "stop" for c in output.outputs)
        for completion in output.outputs:
            if completion.finish_reason == "stop":
                _check("json", completion.text)
            else:  # sampled at temperature 1, a string may run to max_tokens
                assert completion.finish_reason == "length"
        if attempt == 1:
            assert (output.num_cached_tokens or 0) > 0


def test_a_grammar_that_cannot_finish_ends_at_max_tokens(llm: LLM) -> None:
    params = _params({"regex": "a+"}, max_tokens=5, ignore_eos=False)
    (output,) = llm.generate(["Say aaaa:"], params, use_tqdm=False)
    completion = output.outputs[0]
    assert completion.finish_reason == "length"
    assert len(completion.token_ids) == 5
    assert re.fullmatch("a+", completion.text)


def test_invalid_constraints_are_refused_before_the_engine(llm: LLM) -> None:
    with pytest.raises(ValueError, match="structured_outputs.regex is invalid"):
        llm.generate(["x"], _params({"regex": "(unclosed"}), use_tqdm=False)
    # The engine keeps serving.
    _check("choice", llm.generate(["Yes or no?"], _params({"choice": CHOICES}))[0].outputs[0].text)


def test_preemption_keeps_the_matchers_in_step() -> None:
    llm = LLM(block_size=8, num_gpu_blocks_override=16, max_model_len=128)
    # Six JSON answers of ~30 tokens each outgrow the 128-token cache together.
    cases = [CASES[0]] * 6 + CASES[1:]
    outputs = llm.generate(
        [prompt for _, prompt, _ in cases],
        [_params(f, max_tokens=60) for _, _, f in cases],
        use_tqdm=False,
    )
    assert llm.llm_engine.engine_core.scheduler.num_preemptions_total > 0
    for (kind, _, _), output in zip(cases, outputs):
        assert output.outputs[0].finish_reason == "stop"
        _check(kind, output.outputs[0].text)


@pytest.mark.parametrize("backend", ["guidance", "auto"])
def test_the_guidance_backend_and_lark_grammars(backend: str) -> None:
    """llguidance serves every kind as the chosen backend, and Lark grammars (which xgrammar
    does not take) under auto."""
    llm = LLM(structured_outputs_config={"backend": backend})
    cases = [*CASES, ("lark", "Some numbers:", {"grammar": LARK})]
    if backend == "auto":
        cases = cases[-1:]
    outputs = llm.generate(
        [prompt for _, prompt, _ in cases], [_params(f) for _, _, f in cases], use_tqdm=False
    )
    for (kind, _, _), output in zip(cases, outputs):
        completion = output.outputs[0]
        if kind == "lark" and completion.finish_reason == "length":
            # The number list may go on to max_tokens: what came is a prefix of the language.
            assert re.fullmatch(r"([0-9]{1,3},)*[0-9]{0,3}", completion.text), completion.text
            continue
        assert completion.finish_reason == "stop"
        _check(kind, completion.text)


def test_a_random_weight_model_still_emits_valid_json(tmp_path: Path) -> None:
    from tests.tiny_llama import make_tiny_llama

    llm = LLM(str(make_tiny_llama(tmp_path / "tiny")), max_model_len=256)
    schema = {
        "type": "object",
        "properties": {"ok": {"type": "boolean"}, "n": {"type": "integer", "maximum": 99}},
        "required": ["ok", "n"],
        "additionalProperties": False,
    }
    params = SamplingParams(
        temperature=0.8,
        seed=1,
        max_tokens=60,
        structured_outputs=StructuredOutputsParams(json=schema, disable_any_whitespace=True),
    )
    outputs = llm.generate(["a", "b", "c", "d"], params, use_tqdm=False)
    finished = [o.outputs[0] for o in outputs if o.outputs[0].finish_reason == "stop"]
    assert finished, [o.outputs[0].text for o in outputs]
    for completion in finished:
        jsonschema.validate(json.loads(completion.text), schema)


def test_a_slow_grammar_delays_only_its_own_request(monkeypatch: pytest.MonkeyPatch) -> None:
    """While one request's grammar compiles (held here until released), the other requests'
    steps go on: it waits in the queue, they produce tokens."""
    import threading

    from pagoda.config import EngineArgs
    from pagoda.engine.llm_engine import LLMEngine
    from pagoda.structured_output import backends

    release = threading.Event()
    compile_json = backends.XgrammarBackend.compile

    def held_compile(self: Any, spec: Any) -> Any:
        if spec.kind == "regex":
            assert release.wait(60), "the test never released the compile"
        return compile_json(self, spec)

    monkeypatch.setattr(backends.XgrammarBackend, "compile", held_compile)
    engine = LLMEngine.from_engine_args(EngineArgs())
    engine.add_request("slow", "My phone number is", _params({"regex": PHONE}))
    engine.add_request("free", "The capital of France is", SamplingParams(max_tokens=6))
    outputs: dict[str, Any] = {}
    for _ in range(8):  # the free request finishes while the slow one's grammar is held
        for output in engine.step():
            outputs[output.request_id] = output
    assert outputs["free"].finished and len(outputs["free"].outputs[0].token_ids) == 6
    assert "slow" not in outputs
    release.set()
    while engine.has_unfinished_requests():
        for output in engine.step():
            outputs[output.request_id] = output
    _check("regex", outputs["slow"].outputs[0].text)
