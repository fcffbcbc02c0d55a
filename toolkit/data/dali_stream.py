# NVIDIA DALI backend (data.backend: dali): fn.readers.webdataset on the same shards, GPU or CPU decoding.
"""Optional (`pip install .[dali]`). The pipeline reads the shards through their DALI index files, takes
the JPEG and the binary int32 label (DALI cannot parse the text `cls`), decodes on the GPU ('mixed',
nvJPEG) when one is present and on the CPU otherwise, and applies the recipe's augmentations: a random
flip for the margin objective, or the two MoCo-v2 views for UniMoCo (colour jitter, grayscale, Gaussian
blur, flip; DALI draws its own random numbers, so the views follow the same distributions as
toolkit.data.transforms, not the same pixels). Ranks read disjoint parts of the shards
(shard_id = rank, num_shards = world size).

Differences from the webdataset backend, by design of DALI: the position resumes at the same epoch and
batch count, but DALI's shuffle restarts from a new seed (not sample-exact); a sample without an image
or label is passed over silently (missing_component_behavior 'skip', not counted); a corrupt JPEG stops
the pipeline. Run it on shards written (and so validated) by launch/prepare_data.py; identity-grouped
batches (samples_per_label > 1) are only built by the webdataset backend.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from toolkit.data.loader import EpochStream
from toolkit.data.shard_stream import ShardedTrainSet
from toolkit.data.shards import IMAGE_EXT, LABEL_INT32_EXT, dali_index_path
from toolkit.data.transforms import ViewAugmentation
from toolkit.errors import FaceCLError

_READER_NAME = "shards"


def dali_available() -> bool:
    try:
        import nvidia.dali  # noqa: F401
    except ImportError:
        return False
    return True


@dataclass(frozen=True)
class DaliOptions:
    """Pipeline settings (the recipe's data.dali section maps onto these fields)."""

    decode_device: str = "auto"     # 'mixed' (GPU nvJPEG), 'cpu', or 'auto' (mixed when a GPU is present)
    num_threads: int = 4            # CPU threads of the pipeline
    shuffle_buffer: int = 4096      # samples the reader holds for random shuffling (initial_fill)
    prefetch_batches: int = 2       # prefetch_queue_depth


def _moco_view(fn, types, images, cfg: ViewAugmentation, blur_scale: float):
    """One MoCo-v2 view in DALI ops; each random step is on or off per sample through 0/1 factors."""
    brightness, contrast, saturation, hue = cfg.color_jitter
    jitter_on = fn.cast(fn.random.coin_flip(probability=cfg.color_jitter_p), dtype=types.FLOAT)
    gray_on = fn.cast(fn.random.coin_flip(probability=cfg.grayscale_p), dtype=types.FLOAT)

    def factor(strength: float):
        return 1.0 + jitter_on * (fn.random.uniform(range=[max(0.0, 1.0 - strength), 1.0 + strength]) - 1.0)

    images = fn.color_twist(images, brightness=factor(brightness), contrast=factor(contrast),
                            saturation=factor(saturation) * (1.0 - gray_on),
                            hue=jitter_on * fn.random.uniform(range=[-360.0 * hue, 360.0 * hue]))
    blur_on = fn.cast(fn.random.coin_flip(probability=cfg.blur_p), dtype=types.FLOAT)
    sigma = fn.random.uniform(range=[cfg.blur_sigma[0] * blur_scale, cfg.blur_sigma[1] * blur_scale])
    blurred = fn.gaussian_blur(images, sigma=sigma)
    images = fn.cast(blurred, dtype=types.FLOAT) * blur_on + fn.cast(images, dtype=types.FLOAT) * (1.0 - blur_on)
    mirror = fn.random.coin_flip(probability=0.5) if cfg.flip else 0
    return fn.crop_mirror_normalize(images, dtype=types.FLOAT, output_layout="CHW", mean=[127.5] * 3,
                                    std=[127.5] * 3, mirror=mirror)


class DaliBatchStream(EpochStream):
    """Endless (images, labels) batches from a DALI pipeline; the same interface as ShardBatchStream. The
    position (epoch, batch in epoch) is exact; DALI's own shuffle state is not saved, so a resume reads the
    same share of the epoch, reshuffled from a seed of its position (`resumes_sample_exactly` stays False)."""

    backend = "dali"

    def __init__(self, train_set: ShardedTrainSet, batch_size: int, *, seed: int, rank: int = 0, world_size: int = 1,
                 flip: bool = True, views: ViewAugmentation | None = None, image_size: int = 112,
                 config: DaliOptions = DaliOptions(), device: torch.device | None = None):
        if not dali_available():
            raise FaceCLError("data.backend 'dali' needs NVIDIA DALI: pip install .[dali] "
                              "(or pip install nvidia-dali-cuda130), or use data.backend 'webdataset'")
        if train_set.samples_per_label != 1:
            raise FaceCLError("data.backend 'dali' does not build identity-grouped batches; use 'webdataset'")
        self.train_set = train_set
        self.batch_size, self.seed, self.rank, self.world_size = batch_size, seed, rank, world_size
        self.flip, self.views, self.image_size, self.config = flip, views, image_size, config
        decode_device = config.decode_device
        if decode_device == "auto":
            decode_device = "mixed" if torch.cuda.is_available() else "cpu"
        if decode_device == "mixed" and not torch.cuda.is_available():
            raise FaceCLError("data.dali.decode_device 'mixed' needs a GPU; none is visible (use 'cpu' or 'auto')")
        self.decode_device = decode_device
        if decode_device == "mixed":
            self.device = device if device is not None and device.type == "cuda" else \
                torch.device("cuda", torch.cuda.current_device())
        else:
            self.device = torch.device("cpu")
        self.batches_per_epoch = len(train_set) // (batch_size * world_size)
        if self.batches_per_epoch < 1:
            raise ValueError(f"data set of {len(train_set)} samples is smaller than one global batch of "
                             f"{batch_size} x {world_size} ranks")
        self.epoch = 0
        self.batch_in_epoch = 0
        self._pipe = None
        self._iterator = None

    def _build_pipeline(self):
        from nvidia.dali import fn, pipeline_def, types

        manifest = self.train_set.manifest
        shards = [manifest.shard_path(entry) for entry in manifest.shards if entry.num_samples > 0]
        missing = [str(dali_index_path(p)) for p in shards if not dali_index_path(p).is_file()]
        if missing:
            raise FaceCLError(f"DALI index files missing (first: {missing[0]}); convert the data again with "
                              "launch/prepare_data.py, which writes one per shard")
        stored_size, size = manifest.image_size, self.image_size
        decode_device, views, flip = self.decode_device, self.views, self.flip
        # A resumed run reshuffles from a seed of its position (DALI's own shuffle state is not saved).
        seed = (self.seed * 1_000_003 + self.epoch * 10_007 + self.batch_in_epoch) * 64 + self.rank
        device_id = self.device.index if self.device.type == "cuda" else None

        @pipeline_def(batch_size=self.batch_size, num_threads=self.config.num_threads, device_id=device_id,
                      seed=seed % (2**31), prefetch_queue_depth=self.config.prefetch_batches)
        def face_pipeline():
            jpegs, labels = fn.readers.webdataset(
                paths=[str(p) for p in shards], index_paths=[str(dali_index_path(p)) for p in shards],
                ext=[IMAGE_EXT, LABEL_INT32_EXT], dtypes=[types.UINT8, types.INT32],
                missing_component_behavior="skip", random_shuffle=True, initial_fill=self.config.shuffle_buffer,
                shard_id=self.rank, num_shards=self.world_size, name=_READER_NAME)
            images = fn.decoders.image(jpegs, device=decode_device, output_type=types.RGB)
            if size != stored_size:
                images = fn.resize(images, size=[size, size])
            if views is not None:
                query = _moco_view(fn, types, images, views, size / 112)
                key = _moco_view(fn, types, images, views, size / 112)
                return fn.stack(query, key), labels
            mirror = fn.random.coin_flip(probability=0.5) if flip else 0
            return fn.crop_mirror_normalize(images, dtype=types.FLOAT, output_layout="CHW", mean=[127.5] * 3,
                                            std=[127.5] * 3, mirror=mirror), labels

        pipe = face_pipeline()
        pipe.build()
        return pipe

    def _start_epoch(self):
        """The pipeline's batches (one pipeline across epochs: DALI reshuffles as it reads)."""
        if self._pipe is None:
            self._pipe = self._build_pipeline()
        while True:
            yield self._run_pipeline()

    def _run_pipeline(self) -> tuple[torch.Tensor, torch.Tensor]:
        from nvidia.dali.plugin.pytorch import feed_ndarray

        try:
            images_out, labels_out = self._pipe.run()
        except RuntimeError as exc:
            lines = [line.strip() for line in str(exc).splitlines() if line.strip()
                     and "pipeline" not in line.lower() and not line.strip().startswith(("File ", "encountered"))]
            first_line = lines[-1] if lines else type(exc).__name__
            raise FaceCLError(f"DALI pipeline failed on {self.train_set.manifest_path}: {first_line} "
                              "(the webdataset backend skips damaged samples)") from None
        images_tensor = images_out.as_tensor()
        images = torch.empty(images_tensor.shape(), dtype=torch.float32, device=self.device)
        feed_ndarray(images_tensor, images)
        labels_tensor = labels_out.as_cpu().as_tensor() if hasattr(labels_out, "as_cpu") else labels_out.as_tensor()
        labels = torch.empty(labels_tensor.shape(), dtype=torch.int32)
        feed_ndarray(labels_tensor, labels)
        return images, labels.view(-1).long()

    def next_batch(self) -> tuple[torch.Tensor, torch.Tensor]:
        batch = self._next_item()
        self.batch_in_epoch += 1
        return batch

    def state_dict(self) -> dict:
        return {"backend": self.backend, "epoch": self.epoch, "batch_in_epoch": self.batch_in_epoch,
                "seed": self.seed, "world_size": self.world_size, "batch_size": self.batch_size,
                "data": self.train_set.manifest.fingerprint()}

    def load_state_dict(self, state: dict, allow_world_size_change: bool = False) -> None:
        if state.get("backend") != self.backend:
            raise ValueError(f"data position was saved by the {state.get('backend', 'synthetic')!r} backend, this "
                             f"run reads {self.backend!r}")
        current = self.state_dict()
        resized = allow_world_size_change and state.get("world_size") != self.world_size
        for key in ["seed", "data"] + ([] if resized else ["world_size", "batch_size"]):
            if state.get(key) != current[key]:
                raise ValueError(f"data position was saved with {key}={state.get(key)!r}, this run has "
                                 f"{key}={current[key]!r}")
        self.epoch, self.batch_in_epoch = int(state["epoch"]), int(state["batch_in_epoch"])
        if resized:   # the same share of the epoch (the per-rank batch may change with the world size)
            consumed = self.batch_in_epoch * state["batch_size"] * state["world_size"]
            self.batch_in_epoch = min(consumed // (self.batch_size * self.world_size), self.batches_per_epoch)
        self._pipe = None
        self._iterator = None

    def close(self) -> None:
        """Drop the pipeline (its threads end with it); the position is kept."""
        self._iterator = None
        self._pipe = None

    def skip_stats(self) -> dict[str, int]:
        """DALI passes over incomplete samples without counting them: nothing to report."""
        return {}
