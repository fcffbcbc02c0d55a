# Built-in synthetic faces: seeded images where each identity has a stable look and each sample varies.
"""Synthetic identities that a model can learn, generated on the fly from seeds (no files).

An identity is a smooth, left-right symmetric colour pattern (a random coarse grid, mirrored and
upsampled, like a face's layout). A sample of it is that pattern shifted, with brightness, contrast and
per-channel colour changed, plus a small per-sample deformation and pixel noise. Everything is a pure
function of (seed, identity, sample index), so any worker on any rank produces the same image for the
same key and a resumed run sees the same pixels.

Images come out as float32 C x H x W in [-1, 1], the normalisation real data gets too.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from toolkit.data.transforms import ViewAugmentation, two_views_batch

# Side of the coarse grid that defines an identity: small enough to be smooth, large enough for variety.
_PATTERN_GRID = 6
_SALT_IDENTITY = 0x1D_E471
_SALT_SAMPLE = 0x5A_3B1E
_SALT_PAIRS = 0x9A_1125


def _generator(*parts: int) -> torch.Generator:
    """A CPU generator seeded from a tuple of ints (stable across processes, unlike hash())."""
    seed = 0x2545F491
    for part in parts:
        seed = (seed * 0x100000001B3 ^ (int(part) & 0xFFFFFFFFFFFF)) % (2**63 - 1)
    return torch.Generator().manual_seed(seed)


@dataclass(frozen=True)
class SyntheticFaces:
    """Image generator for identities 0..N-1 of one seed; `render(identity, sample)` is deterministic."""

    image_size: int
    seed: int
    noise_std: float = 0.08
    max_shift: int = 8
    color_jitter: float = 0.2

    def identity_pattern(self, identity: int) -> torch.Tensor:
        """The identity's base image, 3 x S x S in [0, 1], symmetric left to right."""
        gen = _generator(self.seed, _SALT_IDENTITY, identity)
        half_3GH = torch.rand(3, _PATTERN_GRID, _PATTERN_GRID // 2, generator=gen)
        grid_3GG = torch.cat([half_3GH, half_3GH.flip(-1)], dim=-1)
        return F.interpolate(grid_3GG[None], size=(self.image_size, self.image_size), mode="bicubic",
                             align_corners=False)[0].clamp(0.0, 1.0)

    def render(self, identity: int, sample: int) -> torch.Tensor:
        """Sample `sample` of `identity`: 3 x S x S float32 in [-1, 1]."""
        size = self.image_size
        gen = _generator(self.seed, _SALT_SAMPLE, identity, sample)
        image_3SS = self.identity_pattern(identity)
        # Per-sample deformation: a weak random coarse pattern, so samples are not just shifted copies.
        wobble = F.interpolate(torch.rand(1, 3, 4, 4, generator=gen) - 0.5, size=(size, size), mode="bilinear",
                               align_corners=False)[0]
        image_3SS = image_3SS + 0.25 * wobble
        jitter = self.color_jitter
        brightness = 1.0 + jitter * (2 * torch.rand(1, generator=gen) - 1)
        contrast = 1.0 + jitter * (2 * torch.rand(1, generator=gen) - 1)
        channel_gain_3 = 1.0 + 0.5 * jitter * (2 * torch.rand(3, generator=gen) - 1)
        mean = image_3SS.mean()
        image_3SS = ((image_3SS - mean) * contrast + mean) * brightness * channel_gain_3[:, None, None]
        shift = max(0, round(self.max_shift * size / 112))
        if shift:
            dy, dx = (torch.randint(-shift, shift + 1, (2,), generator=gen)).tolist()
            padded = F.pad(image_3SS[None], (shift, shift, shift, shift), mode="replicate")[0]
            image_3SS = padded[:, shift + dy: shift + dy + size, shift + dx: shift + dx + size]
        image_3SS = image_3SS + self.noise_std * torch.randn(image_3SS.shape, generator=gen)
        return (image_3SS.clamp(0.0, 1.0) - 0.5) / 0.5


class SyntheticTrainSet(torch.utils.data.Dataset):
    """Training samples: index i is sample i % per_identity of identity i // per_identity.

    Items are looked up by key (index, augmentation seed): the sampler draws the seed, so augmentation
    is part of the resumable data order, not of worker RNG state. One view: 3 x S x S (random flip when
    `flip`); two views (UniMoCo): 2 x 3 x S x S. A DataLoader batch is fetched through `__getitems__`,
    which augments the two views of the whole batch at once (the same pixels as item by item).
    """

    def __init__(self, faces: SyntheticFaces, num_identities: int, samples_per_identity: int, *,
                 flip: bool = True, views: ViewAugmentation | None = None, labeled_fraction: float = 1.0):
        self.faces = faces
        self.num_classes = num_identities
        self.samples_per_identity = samples_per_identity
        self.flip = flip
        self.views = views
        # The first int(fraction * N) identities keep their labels; the others' samples are labeled -1.
        self.num_labeled_identities = int(round(labeled_fraction * num_identities))

    def __len__(self) -> int:
        return self.num_classes * self.samples_per_identity

    def label_of(self, index: int) -> int:
        return index // self.samples_per_identity

    def labels(self) -> torch.Tensor:
        """Identity of every sample, N (for identity-grouped sampling; unlabeled identities included)."""
        return torch.arange(len(self)) // self.samples_per_identity

    def _image_and_label(self, index: int) -> tuple[torch.Tensor, int]:
        identity = self.label_of(index)
        label = identity if identity < self.num_labeled_identities else -1
        return self.faces.render(identity, index % self.samples_per_identity), label

    def __getitem__(self, key: tuple[int, int]) -> tuple[torch.Tensor, int]:
        if self.views is not None:
            return self.__getitems__([key])[0]
        index, aug_seed = key
        image_3SS, label = self._image_and_label(index)
        if self.flip and float(torch.rand(1, generator=torch.Generator().manual_seed(aug_seed))) < 0.5:
            image_3SS = image_3SS.flip(-1)
        return image_3SS, label

    def __getitems__(self, keys: list[tuple[int, int]]) -> list[tuple[torch.Tensor, int]]:
        """The items of a batch of keys; two views are augmented for the whole batch at once."""
        if self.views is None:
            return [self[key] for key in keys]
        images, labels = zip(*(self._image_and_label(index) for index, _ in keys))
        views_B23SS = two_views_batch(torch.stack(images), [aug_seed for _, aug_seed in keys], self.views)
        return list(zip(views_B23SS.unbind(0), labels))


class SyntheticPairs:
    """Verification pairs from held-out identities [first_identity, first_identity + num_identities).

    Pairs are laid out so that every block of len/num_folds consecutive pairs holds equally many
    positive and negative pairs, as in LFW's 10 folds. Image 2k and 2k+1 form pair k.
    """

    def __init__(self, faces: SyntheticFaces, first_identity: int, num_identities: int, num_pairs: int):
        gen = _generator(faces.seed, _SALT_PAIRS, first_identity, num_identities, num_pairs)
        self.faces = faces
        self.num_pairs = num_pairs
        # For every pair: identities (a, b) and sample numbers; samples are far above the training range.
        ids_a = torch.randint(0, num_identities, (num_pairs,), generator=gen)
        offsets = torch.randint(1, num_identities, (num_pairs,), generator=gen)
        is_same_P = (torch.arange(num_pairs) % 2 == 0)
        ids_b = torch.where(is_same_P, ids_a, (ids_a + offsets) % num_identities)
        self.identities_P2 = torch.stack([ids_a, ids_b], dim=1) + first_identity
        self.samples_P2 = torch.randint(1_000_000, 2_000_000, (num_pairs, 2), generator=gen)
        self.is_same_P = is_same_P

    def __len__(self) -> int:
        """Number of images (two per pair)."""
        return 2 * self.num_pairs

    def image(self, image_index: int) -> torch.Tensor:
        pair, side = divmod(image_index, 2)
        return self.faces.render(int(self.identities_P2[pair, side]), int(self.samples_P2[pair, side]))

    def __getitem__(self, image_index: int) -> torch.Tensor:
        return self.image(image_index)
