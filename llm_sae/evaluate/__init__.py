"""Evaluate: reconstruction, sparsity and next-token loss with the SAE spliced in."""

from llm_sae.evaluate.config import EvalConfig, EvalError
from llm_sae.evaluate.run import evaluate, evaluate_saes

__all__ = ["EvalConfig", "EvalError", "evaluate", "evaluate_saes"]
