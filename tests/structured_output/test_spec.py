"""StructuredOutputsParams' rules (vLLM's messages), the spec the backends compile, and the API
side's check of schemas, regexes and grammars (llguidance, no torch)."""

from __future__ import annotations

import importlib.util
import re
import subprocess
import sys

import pytest

from pagoda import SamplingParams, StructuredOutputsParams
from pagoda.structured_output.spec import MAX_SPEC_CHARS, choice_regex, grammar_spec
from pagoda.structured_output.validate import check_structured_outputs


def test_exactly_one_constraint_kind() -> None:
    with pytest.raises(ValueError, match="none is specified"):
        StructuredOutputsParams()
    with pytest.raises(ValueError, match="only use one kind"):
        StructuredOutputsParams(json={"type": "object"}, regex="a+")
    with pytest.raises(ValueError, match="cannot be an empty list"):
        StructuredOutputsParams(choice=[])
    with pytest.raises(ValueError, match="empty grammar"):
        StructuredOutputsParams(grammar="  ")
    with pytest.raises(ValueError, match="structural_tag is not supported"):
        StructuredOutputsParams(structural_tag="{}")
    assert StructuredOutputsParams(choice=["a"]).kind == "choice"


def test_sampling_params_take_a_dict_or_the_object() -> None:
    params = SamplingParams(structured_outputs={"regex": "[0-9]+"})  # type: ignore[arg-type]
    assert params.structured_outputs == StructuredOutputsParams(regex="[0-9]+")
    with pytest.raises(TypeError):
        SamplingParams(structured_outputs={"pattern": "x"})  # type: ignore[arg-type]


def test_specs_are_one_key_per_distinct_constraint() -> None:
    a = grammar_spec(StructuredOutputsParams(json={"b": 1, "a": 2}))
    b = grammar_spec(StructuredOutputsParams(json='{"a": 2, "b": 1}'))
    assert a == b and hash(a) == hash(b)
    tight = grammar_spec(StructuredOutputsParams(json={"a": 2}, disable_any_whitespace=True))
    assert tight != grammar_spec(StructuredOutputsParams(json={"a": 2}))
    with pytest.raises(ValueError, match="not valid JSON"):
        grammar_spec(StructuredOutputsParams(json="{nope"))
    with pytest.raises(ValueError, match=f"at most {MAX_SPEC_CHARS}"):
        grammar_spec(StructuredOutputsParams(regex="a" * (MAX_SPEC_CHARS + 1)))


def test_choices_become_a_regex_matching_exactly_one_of_them() -> None:
    choices = ["yes", "no", "a.b", "(x|y)*", "c:\\d"]
    pattern = re.compile(choice_regex(choices))
    for choice in choices:
        assert pattern.fullmatch(choice)
    for other in ["ye", "yesno", "aXb", "x", "c:1"]:
        assert not pattern.fullmatch(other)


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ({"json": {"type": "objectx"}}, "structured_outputs.json is invalid: Invalid type"),
        ({"regex": "[a-z"}, "(?s)structured_outputs.regex is invalid: .*unclosed character class"),
        ({"grammar": "root ::= missing"}, "(?s)structured_outputs.grammar is invalid: .*missing"),
    ],
)
def test_invalid_constraints_are_refused_with_the_librarys_reason(
    fields: dict[str, object], message: str
) -> None:
    with pytest.raises(ValueError, match=message):
        check_structured_outputs(StructuredOutputsParams(**fields))  # type: ignore[arg-type]


def test_valid_constraints_pass_every_kind() -> None:
    for fields in [
        {"json": {"type": "object", "properties": {"a": {"type": "integer"}}}},
        {"json_object": True},
        {"regex": r"\d{3}"},
        {"choice": ["x", "y"]},
        {"grammar": 'root ::= "a" | "b"'},
        {"grammar": 'start: "a" | "b"'},  # Lark
    ]:
        check_structured_outputs(StructuredOutputsParams(**fields))  # type: ignore[arg-type]


def test_the_api_side_check_does_not_import_torch() -> None:
    code = (
        "import sys\n"
        "from pagoda.sampling_params import StructuredOutputsParams as S\n"
        "from pagoda.structured_output.validate import check_structured_outputs as c\n"
        "c(S(json={'type': 'object'}))\n"
        "assert 'torch' not in sys.modules, 'torch was imported'\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


@pytest.mark.skipif(
    importlib.util.find_spec("torch") is not None and __import__("torch").version.cuda is not None,
    reason="CUDA builds of torch bring triton themselves",
)
def test_the_install_has_xgrammar_without_triton() -> None:
    """`make install` installs xgrammar with --no-deps: its wheel would pull triton (~1 GB)."""
    assert importlib.util.find_spec("xgrammar") is not None
    assert importlib.util.find_spec("triton") is None


def test_both_bitmask_paths_mask_the_same_logits(monkeypatch: pytest.MonkeyPatch) -> None:
    import builtins

    import torch

    from pagoda.structured_output.backends import allocate_bitmask, apply_bitmask

    torch.manual_seed(0)
    logits = torch.randn(5, 100)
    bitmask = allocate_bitmask(2, 100)
    bitmask[0, 0] = 0b1011  # row 1 of the logits: tokens 0, 1, 3 (and 32..99) allowed
    bitmask[1, 1] = 0  # row 3: tokens 32..63 masked
    rows = [1, 3]
    fast = logits.clone()
    apply_bitmask(fast, bitmask, rows)
    real_import = builtins.__import__

    def no_xgrammar(name: str, *args: object, **kwargs: object) -> object:
        if name == "xgrammar":
            raise ImportError(name)
        return real_import(name, *args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(builtins, "__import__", no_xgrammar)
    plain = logits.clone()
    apply_bitmask(plain, bitmask, rows)
    assert torch.equal(fast, plain)
    assert torch.isinf(plain[1, 2]) and torch.isinf(plain[1, 31]) and not torch.isinf(plain[1, 3])
    assert torch.isinf(plain[3, 32:64]).all() and not torch.isinf(plain[3, :32]).any()
    assert torch.equal(plain[[0, 2, 4]], logits[[0, 2, 4]])
