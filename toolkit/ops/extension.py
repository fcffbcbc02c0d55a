# Loads the compiled kernels (toolkit._C) once, or explains, in one warning, why the references are used.
"""`FUSED_KERNELS_AVAILABLE` says whether torch.ops.facecl.* are usable in this process.

The references are used instead when the environment variable FACECL_FORCE_REFERENCE is set to anything
but "" or "0" (for debugging and for comparing against the ground truth), or when the extension cannot be
imported (not built, or built against another torch). Either way one FusedKernelsUnavailableWarning is
issued, when toolkit.ops is first imported.
"""

from __future__ import annotations

import os
import warnings

FORCE_REFERENCE_ENV = "FACECL_FORCE_REFERENCE"


class FusedKernelsUnavailableWarning(UserWarning):
    """toolkit.ops runs the plain-PyTorch references instead of the fused kernels."""


def _load_extension() -> str | None:
    """None when the kernels are loaded, else why not."""
    forced = os.environ.get(FORCE_REFERENCE_ENV, "")
    if forced not in ("", "0"):
        return f"{FORCE_REFERENCE_ENV}={forced} is set"
    try:
        import torch  # noqa: F401  (the extension links against libtorch: torch must be loaded first)

        from toolkit import _C  # noqa: F401  (its static initialisers register torch.ops.facecl.*)
    except (ImportError, OSError) as error:
        return f"the extension toolkit._C could not be loaded ({error})"
    return None


UNAVAILABLE_REASON: str | None = _load_extension()
FUSED_KERNELS_AVAILABLE: bool = UNAVAILABLE_REASON is None

if not FUSED_KERNELS_AVAILABLE:
    warnings.warn(
        f"toolkit.ops: {UNAVAILABLE_REASON}; using the plain-PyTorch reference losses instead of the fused kernels "
        f"(same results, more time and memory). Rebuild the kernels with `pip install -e .`.",
        FusedKernelsUnavailableWarning, stacklevel=2)
