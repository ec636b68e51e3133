"""llm_sae: sparse autoencoders for mechanistic interpretability of language models.

The pipeline, one module per stage: harvest → store → train → analyze → dashboard.
"""

__version__ = "0.1.0"
