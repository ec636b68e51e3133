"""Interop: our SAEs and analyses written in other tools' layouts (SAELens, Neuronpedia).

Reading their SAEs lives in ``llm_sae.sae.formats``, so loading needs nothing from here.
"""

from llm_sae.interop.export import ExportConfig, export
from llm_sae.interop.neuronpedia import export_neuronpedia
from llm_sae.interop.saelens import export_saelens
from llm_sae.sae.formats.peers import load_peer, peer_format
from llm_sae.sae.formats.saelens import load_saelens
from llm_sae.sae.formats.sparsify import load_sparsify

__all__ = ["ExportConfig", "export", "export_saelens", "export_neuronpedia", "load_peer", "peer_format",
           "load_saelens", "load_sparsify"]
