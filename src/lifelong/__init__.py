"""lifelong: continual learning on PyTorch Lightning and Hydra."""

from lifelong.run import stream_trainer, train_stream

__all__ = ["stream_trainer", "train_stream"]
__version__ = "0.1.0"
