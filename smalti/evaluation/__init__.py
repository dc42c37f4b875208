"""Evaluators: held-out losses per class and benchmark tasks through lm-evaluation-harness, attested in in-toto."""
