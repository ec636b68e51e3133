"""Harvest: text through a model, activations at hook points into one store per hook."""

from llm_sae.harvest.config import HarvestConfig
from llm_sae.harvest.run import harvest, store_dirs

__all__ = ["HarvestConfig", "harvest", "store_dirs"]
