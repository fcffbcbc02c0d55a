# Labelled aligned faces for evaluation: an identity-folder tree or FaceCL shards read through their DALI index.
"""Datasets whose item i is (image 3 x S x S float32 in [-1, 1], status) and whose `labels_N` holds the
identity of every item; the all-to-all benchmark (toolkit.eval.all_to_all) embeds them.

status 0 = usable; SKIP_MISSING = the file is missing or cannot be decoded (the image is then zeros, and
the evaluation counts it instead of failing on it). Images are resized (bilinear) to S x S when their size
differs. Model input is `(rgb - 127.5) / 127.5`, RGB order (`to_model_input`), as in training.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from toolkit.errors import FaceCLError

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".webp"}
SKIP_MISSING = 1     # status of an item whose file is missing or not decodable


def to_model_input(rgb_HW3: np.ndarray) -> torch.Tensor:
    """uint8 H x W x 3 RGB -> 3 x H x W float32 (rgb - 127.5) / 127.5."""
    return torch.from_numpy(np.array(rgb_HW3, dtype=np.uint8, order="C")).permute(2, 0, 1).float().sub_(127.5).div_(127.5)


class LabelledFolder(torch.utils.data.Dataset):
    """ROOT/IDENTITY/IMAGE aligned faces; label = index of IDENTITY in sorted order. Item = (image, status)."""

    def __init__(self, root: Path, image_size: int = 112):
        self.root, self.image_size = Path(root), image_size
        identities = sorted(p for p in self.root.iterdir() if p.is_dir())
        self.files, labels = [], []
        for label, folder in enumerate(identities):
            for file in sorted(folder.iterdir()):
                if file.suffix.lower() in IMAGE_SUFFIXES:
                    self.files.append(file)
                    labels.append(label)
        if not self.files:
            raise FaceCLError(f"{root}: no images in its identity sub-folders ({sorted(IMAGE_SUFFIXES)})")
        self.labels_N = np.array(labels, dtype=np.int64)

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, i: int):
        from PIL import Image

        try:
            with Image.open(self.files[i]) as image:
                image = image.convert("RGB")
                if image.size != (self.image_size, self.image_size):
                    image = image.resize((self.image_size, self.image_size), Image.BILINEAR)
                rgb = np.asarray(image)
        except (OSError, ValueError, SyntaxError):
            return torch.zeros(3, self.image_size, self.image_size), SKIP_MISSING
        return to_model_input(rgb), 0


def read_dali_index(index: Path) -> list[dict[str, tuple[int, int]]]:
    """The samples of a shard's DALI index (toolkit.data.shards: a first line "v1.2 NUM_SAMPLES", then per
    sample "ext offset size member_name" for each member): [{ext: (offset, size)}] in shard order."""
    samples = []
    for line in index.read_text().splitlines()[1:]:
        fields = line.split()
        samples.append({fields[i]: (int(fields[i + 1]), int(fields[i + 2])) for i in range(0, len(fields) - 3, 4)})
    return samples


class ShardFaces(torch.utils.data.Dataset):
    """Aligned faces of FaceCL WebDataset shards (a manifest.json from launch/prepare_data.py), read by
    offset through each shard's DALI index; labels from the `label.i32` members. Item = (image, status)."""

    def __init__(self, manifest_path: Path, image_size: int = 112):
        from toolkit.data.shards import IMAGE_EXT, LABEL_INT32_EXT, dali_index_path, load_manifest

        try:
            manifest = load_manifest(manifest_path)
        except (FileNotFoundError, ValueError) as exc:
            raise FaceCLError(str(exc)) from None
        self.image_size = image_size
        self.locations: list[tuple[Path, int, int]] = []  # (shard, offset, size) of each JPEG
        labels = []
        for entry in manifest.shards:
            shard = manifest.shard_path(entry)
            index = dali_index_path(shard)
            if not shard.is_file() or not index.is_file():
                raise FaceCLError(f"{manifest_path}: shard {shard} or its index {index} is missing")
            with open(shard, "rb") as handle:
                for line_number, members in enumerate(read_dali_index(index), 2):
                    if IMAGE_EXT not in members or LABEL_INT32_EXT not in members:
                        raise FaceCLError(f"{index} line {line_number}: expected {IMAGE_EXT} and "
                                          f"{LABEL_INT32_EXT} members, got {sorted(members)}")
                    handle.seek(members[LABEL_INT32_EXT][0])
                    labels.append(int.from_bytes(handle.read(4), "little", signed=True))
                    self.locations.append((shard, *members[IMAGE_EXT]))
        if not self.locations:
            raise FaceCLError(f"{manifest_path}: the shards hold no samples")
        self.labels_N = np.array(labels, dtype=np.int64)

    def __len__(self) -> int:
        return len(self.locations)

    def __getitem__(self, i: int):
        from toolkit.data.jpeg import CorruptImageError, decode_rgb

        shard, offset, size = self.locations[i]
        try:
            with open(shard, "rb") as handle:
                handle.seek(offset)
                rgb = decode_rgb(handle.read(size), "pil")
        except (OSError, CorruptImageError):
            return torch.zeros(3, self.image_size, self.image_size), SKIP_MISSING
        if rgb.shape[:2] != (self.image_size, self.image_size):
            from PIL import Image

            rgb = np.asarray(Image.fromarray(rgb).resize((self.image_size, self.image_size), Image.BILINEAR))
        return to_model_input(rgb), 0
