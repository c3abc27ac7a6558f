"""Build and install sam_fast.

The extension ``sam_fast._C`` is built from ``csrc/``:

* ``csrc/*.cpp`` and ``csrc/cpu/*.cpp`` always (op schemas and CPU kernels);
* ``csrc/cuda/*.cu`` only when a CUDA toolkit (nvcc) and a CUDA build of torch are present.

``SAM_FAST_BUILD_CUDA=1`` forces the CUDA sources (and fails loudly when that is impossible),
``SAM_FAST_BUILD_CUDA=0`` skips them. ``SAM_FAST_SANITIZE=1`` builds the C++ sources with AddressSanitizer and
UndefinedBehaviorSanitizer (a test build: ``python -m tools.sanitize_cpu_ops`` makes and runs one).

Triton kernels live in ``kernels/`` and are installed as the subpackage ``sam_fast.kernels``; the benchmark
harness in ``bench/`` as ``sam_fast.bench`` so that the ``sam-fast bench`` command works from any install.
"""

import glob
import os
import sys

from setuptools import setup

ROOT = os.path.dirname(os.path.abspath(__file__))


def _locate_cuda_home():
    """Help torch find the toolkit when ``nvcc`` on PATH is a wrapper script outside it.

    torch takes the parent of ``which nvcc``; if no CUDA runtime library lies there, prefer a real
    toolkit at /usr/local/cuda. An explicit CUDA_HOME / CUDA_PATH always wins.
    """
    if os.environ.get("CUDA_HOME") or os.environ.get("CUDA_PATH"):
        return
    import shutil

    nvcc = shutil.which("nvcc")
    if nvcc is None:
        return
    guess = os.path.dirname(os.path.dirname(nvcc))
    has_runtime = any(
        glob.glob(os.path.join(guess, sub, "libcudart.so*")) for sub in ("lib64", "lib", "targets/*/lib")
    )
    if not has_runtime and os.path.exists("/usr/local/cuda/bin/nvcc"):
        os.environ["CUDA_HOME"] = "/usr/local/cuda"


def _want_cuda():
    _locate_cuda_home()
    import torch
    from torch.utils.cpp_extension import CUDA_HOME

    flag = os.environ.get("SAM_FAST_BUILD_CUDA", "").strip()
    have_toolkit = CUDA_HOME is not None and os.path.exists(os.path.join(CUDA_HOME, "bin", "nvcc"))
    have_cuda_torch = torch.version.cuda is not None
    if flag == "1":
        if not (have_toolkit and have_cuda_torch):
            raise RuntimeError(
                "SAM_FAST_BUILD_CUDA=1 but CUDA sources cannot be built: "
                f"CUDA toolkit found={have_toolkit} (CUDA_HOME={CUDA_HOME}), "
                f"torch CUDA build={have_cuda_torch} (torch {torch.__version__})"
            )
        return True
    if flag == "0":
        return False
    if flag not in ("", "auto"):
        raise RuntimeError(f"SAM_FAST_BUILD_CUDA must be 0, 1 or unset, got {flag!r}")
    return have_toolkit and have_cuda_torch


def _extensions():
    _locate_cuda_home()  # before torch.utils.cpp_extension reads CUDA_HOME at import
    from torch.utils.cpp_extension import CppExtension, CUDAExtension

    cpp = sorted(glob.glob("csrc/*.cpp") + glob.glob("csrc/cpu/*.cpp"))
    # no FMA contraction in the CPU kernels' AVX-512 paths: they round as the references' separate ops do
    cxx_flags = ["-O3", "-ffp-contract=off"]
    # ATen's at::parallel_for is a header template whose OpenMP region is compiled into the caller: without
    # -fopenmp every C++ CPU op would run on one thread whatever torch.set_num_threads says. Linux wheels of
    # torch ship libgomp.so.1, which the loader then shares with this extension (one thread pool).
    link_flags = []
    if sys.platform.startswith("linux"):
        cxx_flags.append("-fopenmp")
        link_flags.append("-fopenmp")
    if os.environ.get("SAM_FAST_SANITIZE", "").strip() not in ("", "0"):
        # -fno-sanitize=vptr: torch's classes are not built with the RTTI that check needs (false reports)
        sanitize = ["-fsanitize=address,undefined", "-fno-sanitize=vptr", "-fno-sanitize-recover=all",
                    "-fno-omit-frame-pointer", "-g"]
        cxx_flags += sanitize
        link_flags += sanitize
    if _want_cuda():
        if not os.environ.get("TORCH_CUDA_ARCH_LIST"):
            import torch

            # With no GPU visible torch cannot pick architectures; build Ampere and Hopper code
            # (and PTX for newer GPUs). On a GPU machine torch targets the visible device.
            if not torch.cuda.is_available():
                os.environ["TORCH_CUDA_ARCH_LIST"] = "8.0;9.0+PTX"
        cu = sorted(glob.glob("csrc/cuda/*.cu"))
        nvcc_flags = ["-O3", "--expt-relaxed-constexpr", "-lineinfo"]
        return [
            CUDAExtension(
                "sam_fast._C",
                cpp + cu,
                extra_compile_args={"cxx": cxx_flags + ["-DSAM_FAST_WITH_CUDA"], "nvcc": nvcc_flags},
                extra_link_args=link_flags,
            )
        ]
    return [CppExtension("sam_fast._C", cpp, extra_compile_args={"cxx": cxx_flags}, extra_link_args=link_flags)]


def _cmdclass():
    from torch.utils.cpp_extension import BuildExtension

    return {"build_ext": BuildExtension.with_options(use_ninja=True)}


setup(
    packages=[
        "sam_fast",
        "sam_fast.ops",
        "sam_fast.reference",
        "sam_fast.nn",
        "sam_fast.models",
        "sam_fast.distill",
        "sam_fast.compress",
        "sam_fast.kernels",
        "sam_fast.kernels.dilated_attention",
        "sam_fast.bench",
    ],
    package_dir={"sam_fast": "sam_fast", "sam_fast.kernels": "kernels",
                 "sam_fast.kernels.dilated_attention": "kernels/dilated_attention", "sam_fast.bench": "bench"},
    package_data={"sam_fast.kernels": ["tuned/*.json"]},
    ext_modules=_extensions(),
    cmdclass=_cmdclass(),
)
