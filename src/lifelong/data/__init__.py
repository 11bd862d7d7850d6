"""Task streams, data sources and tensor-resident batching."""

from lifelong.data.catalog import PermutedStream, RotatedStream, SequenceStream, SplitStream
from lifelong.data.sources import SOURCES, ImageSplit, find_image_dataset, load_image_dataset
from lifelong.data.streams import TaskStream, stream_of
from lifelong.data.tensors import TaskData, TensorBatchLoader
from lifelong.errors import CorruptDataError, DataNotFoundError

__all__ = [
    "SOURCES",
    "CorruptDataError",
    "DataNotFoundError",
    "ImageSplit",
    "PermutedStream",
    "RotatedStream",
    "SequenceStream",
    "SplitStream",
    "TaskData",
    "TaskStream",
    "TensorBatchLoader",
    "find_image_dataset",
    "load_image_dataset",
    "stream_of",
]
