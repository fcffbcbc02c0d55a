# insightface verification sets (lfw.bin, cfp_fp.bin, agedb_30.bin): a restricted unpickler and pair images.
"""A `.bin` file is a pickle of (list of JPEG bytes, list of bool); images 2k and 2k+1 form pair k.

Unpickling can run arbitrary code, so these files are read with an unpickler that resolves no global
except `_codecs.encode` (how Python 3 writes `bytes` at pickle protocols 0-2) and then checks that the
result has exactly the expected shape and types. A pickle that names any other callable (os.system,
builtins.eval, numpy reconstruction, ...) is refused before anything is called.
"""

from __future__ import annotations

import codecs
import io
import pickle
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from toolkit.data.jpeg import CorruptImageError, decode_rgb, resolve_decoder
from toolkit.errors import FaceCLError

# Python 2 pickles hold str, read back as bytes with encoding="bytes"; Python 3 protocol <= 2 pickles
# write bytes as _codecs.encode(text, 'latin1'). Nothing else is needed for (list[bytes], list[bool]).
_ALLOWED_GLOBALS = {("_codecs", "encode"): codecs.encode}


class UnsafePickleError(FaceCLError):
    """A pickle that asks for something a verification set never contains."""


class _VerificationUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str):
        try:
            return _ALLOWED_GLOBALS[(module, name)]
        except KeyError:
            raise UnsafePickleError(f"refusing to load {module}.{name} from a verification .bin: only lists of "
                                    "JPEG bytes and booleans are allowed") from None

    def persistent_load(self, pid):
        raise UnsafePickleError("refusing a persistent id in a verification .bin")


def load_verification_pickle(data: bytes, source: str = "<bytes>") -> tuple[list[bytes], list[bool]]:
    """(images, is_same) from the bytes of a .bin file, through the restricted unpickler."""
    try:
        loaded = _VerificationUnpickler(io.BytesIO(data), encoding="bytes").load()
    except UnsafePickleError as exc:
        raise UnsafePickleError(f"{source}: {exc}") from None
    except Exception as exc:  # malformed pickles raise many types (UnpicklingError, EOFError, ...)
        raise FaceCLError(f"{source} is not a verification .bin pickle ({type(exc).__name__}: {exc})") from None
    if not (isinstance(loaded, (tuple, list)) and len(loaded) == 2):
        raise FaceCLError(f"{source}: expected a pair (images, is_same), got {type(loaded).__name__}")
    images, is_same = loaded
    if not isinstance(images, (list, tuple)) or not all(isinstance(x, (bytes, bytearray)) for x in images):
        raise FaceCLError(f"{source}: the first element must be a list of JPEG bytes")
    if not isinstance(is_same, (list, tuple)) or not all(isinstance(x, (bool, int)) and x in (0, 1) for x in is_same):
        raise FaceCLError(f"{source}: the second element must be a list of booleans")
    if len(images) != 2 * len(is_same):
        raise FaceCLError(f"{source}: {len(images)} images for {len(is_same)} pairs (expected 2 per pair)")
    return [bytes(x) for x in images], [bool(x) for x in is_same]


class VerificationBin:
    """Pairs of an insightface .bin file; the interface of SyntheticPairs: `len` = number of images,
    `[i]` = image i as float32 3 x S x S in [-1, 1], `is_same_P` = bool per pair."""

    def __init__(self, path: str | Path, image_size: int = 112, decoder: str = "auto"):
        self.path = Path(path)
        if not self.path.is_file():
            raise FaceCLError(f"verification set not found: {self.path}")
        self.images, is_same = load_verification_pickle(self.path.read_bytes(), str(self.path))
        self.is_same_P = torch.tensor(is_same, dtype=torch.bool)
        self.num_pairs = len(is_same)
        self.image_size = image_size
        self.decoder = resolve_decoder(decoder)
        self.name = self.path.stem

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, image_index: int) -> torch.Tensor:
        try:
            rgb = decode_rgb(self.images[image_index], self.decoder)
        except CorruptImageError as exc:
            raise FaceCLError(f"{self.path}: image {image_index} cannot be decoded ({exc})") from None
        image_3HW = torch.from_numpy(np.ascontiguousarray(rgb)).permute(2, 0, 1).float().div_(127.5).sub_(1.0)
        if image_3HW.shape[-2:] != (self.image_size, self.image_size):
            image_3HW = F.interpolate(image_3HW[None], size=(self.image_size, self.image_size), mode="bilinear",
                                      antialias=True, align_corners=False)[0].clamp_(-1.0, 1.0)
        return image_3HW

    def image(self, image_index: int) -> torch.Tensor:
        return self[image_index]
