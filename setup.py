"""Builds msfast._C: the C++ kernels always, the CUDA kernels when wanted and possible.

Environment switches (also listed in the README):
  MSFAST_CUDA=auto|1|0   auto (default): build the CUDA kernels when torch is a CUDA build and
                         nvcc is found (no GPU needed); 1: require them; 0: CPU only.
  TORCH_CUDA_ARCH_LIST   GPU architectures to compile for (default: those of the visible GPUs,
                         else "9.0").
  MSFAST_DEBUG=1         -O0 -g, for debugging the kernels.
  MAX_JOBS               parallel compile jobs (ninja).
"""

import glob
import os
import site
import sys

import torch
from setuptools import setup
from torch.utils import cpp_extension

ROOT = os.path.dirname(os.path.abspath(__file__))
DEFAULT_ARCHS = "9.0"


def _default_archs():
    """The visible GPUs' architectures (as torch's own default), else DEFAULT_ARCHS on a machine
    without a GPU (CI): one architecture keeps the build short."""
    try:
        if torch.cuda.is_available():
            caps = sorted({torch.cuda.get_device_capability(i) for i in range(torch.cuda.device_count())})
            return ";".join(f"{major}.{minor}" for major, minor in caps)
    except Exception:  # a broken driver: build the default, the kernels are checked at run time
        pass
    return DEFAULT_ARCHS


def _cuda_wanted():
    flag = os.environ.get("MSFAST_CUDA", "auto").strip().lower()
    if flag not in ("auto", "1", "0", "on", "off", "true", "false"):
        sys.exit(f"MSFAST_CUDA must be auto, 1 or 0, got {flag!r}")
    if flag in ("0", "off", "false"):
        return False, "disabled by MSFAST_CUDA=0"
    problems = []
    if torch.version.cuda is None:
        problems.append("torch is a CPU-only build")
    if cpp_extension.CUDA_HOME is None:
        problems.append("no CUDA toolkit (set CUDA_HOME, nvcc not found)")
    if not glob.glob(os.path.join(ROOT, "csrc", "cuda", "*.cu")):
        problems.append("no CUDA sources in csrc/cuda")
    if problems:
        if flag in ("1", "on", "true"):
            sys.exit("MSFAST_CUDA=1 but the CUDA kernels cannot be built: " + "; ".join(problems))
        return False, "; ".join(problems)
    return True, "enabled"


def _extension():
    with_cuda, why = _cuda_wanted()
    print(f"msfast: CUDA kernels {'on' if with_cuda else 'off'} ({why})")
    debug = os.environ.get("MSFAST_DEBUG", "0") == "1"
    opt = ["-O0", "-g"] if debug else ["-O3"]
    defines = [f'-DMSFAST_TORCH_VERSION="{torch.__version__}"']
    cxx = ["-fopenmp", "-fvisibility=hidden", *opt, *defines]
    sources = sorted(glob.glob(os.path.join("csrc", "*.cpp")) + glob.glob(os.path.join("csrc", "cpu", "*.cpp")))
    include_dirs = [os.path.join(ROOT, "csrc")]
    kwargs = dict(extra_link_args=["-fopenmp"])
    if not with_cuda:
        return cpp_extension.CppExtension(
            "msfast._C", sources, include_dirs=include_dirs, extra_compile_args={"cxx": cxx}, **kwargs
        )
    sources = [s for s in sources if not s.endswith("no_cuda.cpp")]
    sources += sorted(glob.glob(os.path.join("csrc", "cuda", "*.cu")))
    archs = os.environ.get("TORCH_CUDA_ARCH_LIST") or _default_archs()
    os.environ["TORCH_CUDA_ARCH_LIST"] = archs
    # torch's CUDA headers include cuSPARSE/cuBLAS headers that some toolkits lack; the
    # CUDA build of torch ships them in site-packages/nvidia/cu*/include.
    for sp in site.getsitepackages() + [os.path.dirname(os.path.dirname(torch.__file__))]:
        include_dirs += sorted(glob.glob(os.path.join(sp, "nvidia", "cu*", "include")))
        include_dirs += sorted(glob.glob(os.path.join(sp, "nvidia", "*", "include")))
    include_dirs = list(dict.fromkeys(include_dirs))
    cuda_defines = ["-DMSFAST_WITH_CUDA", f'-DMSFAST_CUDA_ARCHS="{archs}"']
    return cpp_extension.CUDAExtension(
        "msfast._C",
        sources,
        include_dirs=include_dirs,
        extra_compile_args={
            "cxx": cxx + cuda_defines,
            "nvcc": [*opt, "--expt-relaxed-constexpr", *defines, *cuda_defines],
        },
        **kwargs,
    )


setup(
    ext_modules=[_extension()],
    cmdclass={"build_ext": cpp_extension.BuildExtension.with_options(use_ninja=True)},
)
