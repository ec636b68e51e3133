"""One file per architecture; importing this package registers them all.

To add one: a file here with a subclass of ``llm_sae.sae.base.SAE`` decorated with
``@register``, its import below, and (if it has knobs of its own) its parameters
dataclass at the end of ``PARAMS``, which ``SAEConfig`` is composed of: the order of
``PARAMS`` is the order of the fields in ``cfg.json``, so append, never reorder.
"""

from llm_sae.sae.archs import batchtopk, jumprelu, kl_sigmoid, lista, matryoshka, relu_l1, topk, wta  # noqa: F401
from llm_sae.sae.archs.batchtopk import BatchTopKParams
from llm_sae.sae.archs.jumprelu_gate import JumpReLUParams
from llm_sae.sae.archs.kl_sigmoid import KLSigmoidParams
from llm_sae.sae.archs.lista import LISTAParams
from llm_sae.sae.archs.matryoshka import MatryoshkaParams
from llm_sae.sae.archs.relu_l1 import ReLUL1Params

PARAMS = (ReLUL1Params, JumpReLUParams, KLSigmoidParams, BatchTopKParams, LISTAParams, MatryoshkaParams)
