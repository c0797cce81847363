"""Structured output: constraining a request's tokens to a JSON schema, regex, choice or grammar.

The pieces, in the order a request meets them:

- `spec.py` (torch-free): a request's `StructuredOutputsParams` as one `GrammarSpec` (kind, text,
  options), the key of the compiled-grammar cache.
- `validate.py` (torch-free, in the API process): the spec checked by llguidance, which parses
  schemas, regexes and grammars in microseconds without torch, so an invalid one is a 400 naming
  the field before the request reaches the engine.
- `backends.py` (engine core): the grammar libraries. xgrammar (vLLM's default) compiles a spec
  for the model's vocabulary; llguidance ("guidance") takes what xgrammar rejects (Lark grammars,
  some schema features) under the `auto` backend. Both fill the same int32 token bitmask.
- `manager.py` (engine core): compiles each distinct spec once, on a worker thread off the step
  loop (a request waits in the queue until its grammar is ready), keeps one matcher per request,
  fills the step's bitmask for all constrained requests together, and advances the matchers on
  the sampled tokens. The model runner applies the bitmask to the logits before sampling.
"""
