"""The errors llm_sae raises on purpose. Each message says what is wrong and what to do.

The CLI prints these without a traceback; anything else is a bug and keeps its traceback.
"""


class LlmSaeError(Exception):
    """Base class: bad input or state that the user can fix."""


class StoreError(LlmSaeError):
    """An activation store that is missing, corrupt, or does not fit the request."""


class ModelError(LlmSaeError):
    """A model that cannot be loaded, or a hook name it does not have."""


class DataError(LlmSaeError):
    """A dataset that is empty, unreadable, or lacks the asked-for column."""


class CheckpointError(LlmSaeError):
    """A missing or corrupt SAE checkpoint."""


class AnalyzeError(LlmSaeError):
    """Inputs that cannot be analysed together (e.g. an SAE and a store of other widths)."""


class ExplainError(LlmSaeError):
    """An explanation run that cannot start or go on (endpoint, settings, inputs), or
    an explanations folder that is not the output of ``llm-sae explain``."""
