"""Dashboard: an analysis folder into a static site that works from disk."""

from llm_sae.dashboard.build import build_dashboard
from llm_sae.dashboard.config import DashboardConfig, DashboardError

__all__ = ["DashboardConfig", "DashboardError", "build_dashboard"]
