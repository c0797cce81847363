"""Speculative decoding: proposers draft tokens, the target verifies them in one pass.

`config` parses `--speculative-config`; `ngram` is the prompt-lookup proposer the model runner
calls after each step; `rejection_sampler` accepts or replaces the drafts so that the output
follows exactly the distribution plain sampling would give.
"""
