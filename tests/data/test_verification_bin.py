# insightface .bin verification sets: loaded through the restricted unpickler; malicious pickles are refused.
from __future__ import annotations

import os
import pickle

import pytest
import torch

from tests.data.factories import face_jpeg, identify
from toolkit.data.verification_bin import UnsafePickleError, VerificationBin, load_verification_pickle
from toolkit.errors import FaceCLError


def write_bin(path, protocol: int):
    images = [face_jpeg(k // 2 if k % 4 < 2 else k, k % 7, size=16) for k in range(8)]
    is_same = [True, False, True, False]
    path.write_bytes(pickle.dumps((images, is_same), protocol=protocol))
    return images, is_same


@pytest.mark.parametrize("protocol", [2, pickle.HIGHEST_PROTOCOL])
def test_bin_loads_as_pairs(tmp_path, protocol):
    # Protocol 2 stores bytes as _codecs.encode(...) (the one global allowed); newer protocols as raw bytes.
    images, is_same = write_bin(tmp_path / "lfw.bin", protocol)
    pairs = VerificationBin(tmp_path / "lfw.bin", image_size=16)
    assert len(pairs) == 8 and pairs.num_pairs == 4
    assert torch.equal(pairs.is_same_P, torch.tensor(is_same))
    image = pairs[3]
    assert image.shape == (3, 16, 16) and image.dtype == torch.float32
    assert identify(image) == (3, 3)
    assert VerificationBin(tmp_path / "lfw.bin", image_size=32)[0].shape == (3, 32, 32)


class _RunsCode:
    def __reduce__(self):
        return (os.system, ("echo pwned > /tmp/facecl_pickle_test_marker",))


def test_malicious_pickle_is_refused_without_running_code(tmp_path):
    marker = "/tmp/facecl_pickle_test_marker"
    if os.path.exists(marker):
        os.unlink(marker)
    payload = pickle.dumps(([face_jpeg(0, 0)], [_RunsCode()]))
    (tmp_path / "evil.bin").write_bytes(payload)
    with pytest.raises(UnsafePickleError, match="refusing to load posix.system|refusing to load os.system"):
        VerificationBin(tmp_path / "evil.bin")
    assert not os.path.exists(marker)
    for other in (pickle.dumps(torch.zeros(2)), pickle.dumps([print])):
        with pytest.raises(UnsafePickleError):
            load_verification_pickle(other)


def test_wrong_structure_is_a_clear_error(tmp_path):
    with pytest.raises(FaceCLError, match="3 images for 1 pairs"):
        load_verification_pickle(pickle.dumps(([b"a", b"b", b"c"], [True])))
    with pytest.raises(FaceCLError, match="list of booleans"):
        load_verification_pickle(pickle.dumps(([b"a", b"b"], ["yes"])))
    with pytest.raises(FaceCLError, match="not a verification .bin"):
        load_verification_pickle(b"not a pickle")
