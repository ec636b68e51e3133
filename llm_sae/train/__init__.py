"""Train: batches from a source in, a saved SAE out; resumable, one process or torchrun."""

from llm_sae.train.checkpoint import find_checkpoint, read_checkpoint_meta
from llm_sae.train.config import TrainConfig, TrainingError
from llm_sae.train.run import build_sae, train
from llm_sae.train.trainer import Trainer

__all__ = ["TrainConfig", "TrainingError", "Trainer", "build_sae", "train", "find_checkpoint",
           "read_checkpoint_meta"]
