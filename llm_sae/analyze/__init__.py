"""Analyze: one streaming pass per SAE; per-feature statistics, examples and effects."""

from llm_sae.analyze.config import AnalyzeConfig
from llm_sae.analyze.run import analyze
from llm_sae.common.analysis_files import load_feature, load_index, load_summary
from llm_sae.errors import AnalyzeError

__all__ = ["AnalyzeConfig", "AnalyzeError", "analyze", "load_summary", "load_index", "load_feature"]
