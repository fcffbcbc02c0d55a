# Data sources and batching: synthetic faces (built in) and the resumable batch stream.
from toolkit.data.loader import EpochBatchSampler, ResumableBatchStream
from toolkit.data.synthetic import SyntheticFaces, SyntheticPairs, SyntheticTrainSet

__all__ = ["EpochBatchSampler", "ResumableBatchStream", "SyntheticFaces", "SyntheticPairs", "SyntheticTrainSet"]
