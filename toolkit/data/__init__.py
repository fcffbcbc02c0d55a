# Data sources and batching: synthetic faces, resumable streams; shards, converters, DALI and .bin sets in submodules.
from toolkit.data.loader import EpochBatchSampler, ResumableBatchStream
from toolkit.data.synthetic import SyntheticFaces, SyntheticPairs, SyntheticTrainSet

__all__ = ["EpochBatchSampler", "ResumableBatchStream", "SyntheticFaces", "SyntheticPairs", "SyntheticTrainSet"]
