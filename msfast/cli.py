"""The ``msfast`` command line: ``msfast info``, ``bench``, ``train``, ``eval`` and ``predict``."""

from __future__ import annotations

import argparse
import json
import sys


def _info(args) -> int:
    import torch

    from . import _ops

    info = {
        "msfast": __import__("msfast").__version__,
        "torch": torch.__version__,
        "torch_cuda": torch.version.cuda,
        "cuda_available": torch.cuda.is_available(),
        "threads": torch.get_num_threads(),
        "fallback_active": _ops.fallback_reason() is not None,
        "fallback_reason": _ops.fallback_reason(),
    }
    if _ops._C is not None:
        built = dict(_ops._C.build_info())
        info["built_against_torch"] = built["torch_version"]
        info["cuda_arch_list"] = built["cuda_archs"] or None
        info["openmp"] = built["openmp"]
        info["cpu_isa"] = built["cpu_isa"]
        info["kernels"] = {"cpu": True, "cuda": bool(_ops._C.cuda_built())}
        info["cuda_kernels_in_use"] = _ops.cuda_kernels_enabled() and bool(_ops._C.cuda_built())
    else:
        info["kernels"] = {"cpu": False, "cuda": False}
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(0)
    if args.json:
        print(json.dumps(info, indent=2))
        return 0
    width = max(len(k) for k in info)
    for k, v in info.items():
        if isinstance(v, dict):
            v = ", ".join(f"{kk}={'yes' if vv else 'no'}" for kk, vv in v.items())
        print(f"{k:<{width}}  {v}")
    return 0


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="msfast", description="Fused multi-scale operators for PyTorch")
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("info", help="what was built: torch/CUDA versions, arch list, kernels, fallback")
    p.add_argument("--json", action="store_true", help="print JSON")
    p.set_defaults(func=_info)
    from . import bench, train

    bench.add_parser(sub)
    train.add_parsers(sub)
    args = parser.parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
