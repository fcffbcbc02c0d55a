# Builds toolkit._C, the fused loss kernels (C++ CPU always, CUDA when torch has CUDA and nvcc is found).
"""Package metadata lives in pyproject.toml; this script only adds the extension module.

Choices (environment variables, all optional):

- FACECL_BUILD_EXTENSION=0   install without the kernels (toolkit.ops then uses the PyTorch references);
- FACECL_BUILD_CUDA=0 / 1    never / always build the CUDA kernels (default: when torch is a CUDA build
                             and nvcc is found; 1 fails loudly when that is not possible);
- CUDA_HOME                  the CUDA toolkit; default /usr/local/cuda when it has bin/nvcc, else the
                             real directory of the nvcc on PATH (torch's own guess takes a wrapper
                             script's folder, e.g. /usr/local, which is wrong);
- TORCH_CUDA_ARCH_LIST       default "8.0;9.0+PTX" (A100, H100/H200, PTX for newer GPUs);
- MAX_JOBS                   parallel compile jobs, default the number of CPU cores.
"""

from __future__ import annotations

import os
import shutil
import sys
from pathlib import Path

from setuptools import find_packages, setup

CSRC = Path("kernels") / "csrc"
CPU_SOURCES = [CSRC / "facecl_ops.cpp", CSRC / "cpu" / "kernels_cpu.cpp"]
CUDA_SOURCES = [CSRC / "cuda" / "kernels_cuda.cu"]
DEFAULT_CUDA_ARCHS = "8.0;9.0+PTX"

# -fopenmp: at::parallel_for is header-only OpenMP, without it it runs serially. -fno-trapping-math: without
# it GCC will not if-convert the clamps and selects of the CPU kernels' exp loops on AVX2 or SSE (a speculated
# float op "could trap"), and those loops stay scalar (measured on AVX2: the statistics kernel took 7.7 ns per
# element, vectorised 1.2 ns); no code here enables floating-point traps. No -march: the x86-64-v3/v4 clones
# are picked at load time.
CXX_FLAGS = ["-O3", "-g0", "-fopenmp", "-fno-trapping-math"]
NVCC_FLAGS = ["-O3", "--expt-relaxed-constexpr", "--threads=2"]  # the 2-3 GPU targets in parallel


def log(message: str) -> None:
    print(f"facecl setup: {message}", file=sys.stderr)


def flag(name: str) -> str | None:
    value = os.environ.get(name, "").strip().lower()
    if value in ("", "auto"):
        return None
    if value in ("1", "true", "yes", "on"):
        return "1"
    if value in ("0", "false", "no", "off"):
        return "0"
    raise SystemExit(f"facecl setup: {name} must be 0 or 1, got {os.environ[name]!r}")


def find_cuda_home() -> str | None:
    """CUDA toolkit folder holding bin/nvcc, or None."""
    explicit = os.environ.get("CUDA_HOME") or os.environ.get("CUDA_PATH")
    if explicit:
        return explicit if (Path(explicit) / "bin" / "nvcc").exists() else None
    if (Path("/usr/local/cuda") / "bin" / "nvcc").exists():
        return "/usr/local/cuda"
    nvcc = shutil.which("nvcc")
    if nvcc:
        home = Path(nvcc).resolve().parent.parent
        if (home / "include" / "cuda_runtime_api.h").exists():
            return str(home)
    return None


def extension_modules() -> tuple[list, dict]:
    if flag("FACECL_BUILD_EXTENSION") == "0":
        log("FACECL_BUILD_EXTENSION=0: skipping toolkit._C (toolkit.ops will use the PyTorch references)")
        return [], {}
    try:
        import torch
    except ImportError:
        log("torch is not importable in the build environment: skipping toolkit._C "
            "(toolkit.ops will use the PyTorch references)")
        return [], {}

    want_cuda = flag("FACECL_BUILD_CUDA")
    cuda_home = find_cuda_home() if torch.version.cuda and want_cuda != "0" else None
    use_cuda = cuda_home is not None
    if want_cuda == "1" and not use_cuda:
        raise SystemExit(f"facecl setup: FACECL_BUILD_CUDA=1 but torch.version.cuda={torch.version.cuda!r} and "
                         f"no nvcc was found (set CUDA_HOME)")
    if use_cuda:
        os.environ["CUDA_HOME"] = cuda_home  # read by torch.utils.cpp_extension at import
        os.environ.setdefault("TORCH_CUDA_ARCH_LIST", DEFAULT_CUDA_ARCHS)
    elif torch.version.cuda and want_cuda != "0":
        log(f"torch is a CUDA {torch.version.cuda} build but no nvcc was found: building the CPU kernels only")
    os.environ.setdefault("MAX_JOBS", str(os.cpu_count() or 1))

    from torch.utils.cpp_extension import BuildExtension, CppExtension, CUDAExtension

    sources = [str(path) for path in CPU_SOURCES]
    if use_cuda:
        log(f"building CPU + CUDA kernels (CUDA_HOME={cuda_home}, "
            f"TORCH_CUDA_ARCH_LIST={os.environ['TORCH_CUDA_ARCH_LIST']}, MAX_JOBS={os.environ['MAX_JOBS']})")
        module = CUDAExtension(
            "toolkit._C", sources + [str(path) for path in CUDA_SOURCES],
            extra_compile_args={"cxx": CXX_FLAGS, "nvcc": NVCC_FLAGS}, extra_link_args=["-fopenmp"])
    else:
        log(f"building CPU kernels (MAX_JOBS={os.environ['MAX_JOBS']})")
        module = CppExtension("toolkit._C", sources, extra_compile_args={"cxx": CXX_FLAGS},
                              extra_link_args=["-fopenmp"])
    return [module], {"build_ext": BuildExtension}


ext_modules, cmdclass = extension_modules()
# The commands in launch/ ship as the package toolkit.launch (pyproject.toml's [project.scripts] names them), so that
# an installed wheel runs them without a checkout.
setup(ext_modules=ext_modules, cmdclass=cmdclass,
      packages=[*find_packages(include=["toolkit", "toolkit.*"]), "toolkit.launch"],
      package_dir={"toolkit.launch": "launch"})
