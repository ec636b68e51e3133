"""Built-in benchmarks: ``llm-sae bench recovery`` (ground-truth feature recovery)."""
