"""lifelong: continual learning on PyTorch Lightning and Hydra."""

from lifelong.run import evaluate, stream_trainer, train_stream

__all__ = ["evaluate", "stream_trainer", "train_stream"]
__version__ = "0.1.0"
