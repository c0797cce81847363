"""Checking a request's structured-output constraint before it reaches the engine (torch-free).

llguidance parses JSON schemas, regexes and EBNF/Lark grammars in microseconds and without torch,
so the API process turns an invalid constraint into a 400 that names the field and gives the
library's reason. What llguidance accepts the engine compiles with xgrammar (or llguidance itself
where xgrammar cannot), so a request that passes here does not fail there.
"""

from __future__ import annotations

from pagoda.sampling_params import StructuredOutputsParams
from pagoda.structured_output.spec import GrammarSpec, grammar_spec, guidance_grammar


def check_structured_outputs(params: StructuredOutputsParams) -> GrammarSpec:
    """The spec of `params`, checked.

    Raises:
        ValueError: an invalid or oversized schema, regex, grammar or choice list, naming the
            field (structured_outputs.<kind>) and the grammar library's reason.
    """
    spec = grammar_spec(params)
    try:
        import llguidance
    except ImportError:  # the engine checks again when it compiles
        return spec
    try:
        grammar = guidance_grammar(spec)
        is_error, messages = llguidance.LLMatcher.validate_grammar_with_warnings(grammar)
    except (ValueError, RuntimeError, TypeError) as exc:
        raise ValueError(f"{spec.field} is invalid: {exc}") from None
    if is_error:
        reason = messages[0].strip() if messages else "rejected by the grammar compiler"
        raise ValueError(f"{spec.field} is invalid: {reason}")
    return spec
