"""Task streams, data sources and tensor-resident batching."""

from lifelong.data.sources import ImageSplit, find_image_dataset, load_image_dataset
from lifelong.data.streams import PermutedStream, TaskStream, stream_of
from lifelong.data.tensors import TaskData, TensorBatchLoader
from lifelong.errors import CorruptDataError, DataNotFoundError

__all__ = [
    "CorruptDataError",
    "DataNotFoundError",
    "ImageSplit",
    "PermutedStream",
    "TaskData",
    "TaskStream",
    "TensorBatchLoader",
    "find_image_dataset",
    "load_image_dataset",
    "stream_of",
]
