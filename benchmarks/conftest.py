"""pytest-benchmark suite over the standard cases (msfast/bench.py defines them).

    pytest benchmarks/                       # all CPU variants (several minutes)
    pytest benchmarks/ --bench-quick         # smaller batches
    pytest benchmarks/ --bench-device cuda   # on a GPU

Each case is timed as eager reference, torch.compile(reference, fullgraph=True) and msfast
in one session; the summary at the end prints msfast's speed-up over both per case and the
share of the roofline (bytes that must move over the copy bandwidth measured in the run).
"""

import pytest
import torch

from msfast import bench as B


def pytest_addoption(parser):
    g = parser.getgroup("msfast")
    g.addoption("--bench-device", default="cpu", choices=["cpu", "cuda"], help="device to benchmark")
    g.addoption("--bench-quick", action="store_true", help="smaller batches")
    g.addoption("--bench-no-compile", action="store_true", help="skip the torch.compile baseline")


def pytest_generate_tests(metafunc):
    if "variant" in metafunc.fixturenames:
        cfg = metafunc.config
        vs = B.variants(cfg.getoption("--bench-device"), quick=cfg.getoption("--bench-quick"))
        ids = [f"{v.case}-{v.dtype}-{v.layout}-{v.pass_}" for v in vs]
        metafunc.parametrize("variant", vs, ids=ids)
    if "impl" in metafunc.fixturenames:
        no_compile = metafunc.config.getoption("--bench-no-compile")
        impls = ["eager", "msfast"] if no_compile else ["eager", "compile", "msfast"]
        metafunc.parametrize("impl", impls)


@pytest.fixture(scope="session")
def copy_bandwidth(request):
    dev = request.config.getoption("--bench-device")
    if dev == "cuda" and not torch.cuda.is_available():
        pytest.skip("no CUDA device")
    return B.copy_bandwidth(dev)


def pytest_terminal_summary(terminalreporter, config):
    session = getattr(config, "_benchmarksession", None)
    if session is None or not session.benchmarks:
        return
    groups = {}
    for b in session.benchmarks:
        groups.setdefault(b["group"], {})[b["params"]["impl"]] = b
    tr = terminalreporter
    tr.section("msfast speed-ups (medians, same session)")
    for name, g in sorted(groups.items()):
        if "msfast" not in g:
            continue
        ms = g["msfast"]
        med = ms.stats.median
        parts = [f"msfast {med * 1e3:.2f} ms"]
        for impl in ("eager", "compile"):
            if impl in g:
                parts.append(f"{g[impl].stats.median / med:.1f}x vs {impl}")
        roof = ms["extra_info"].get("roofline_ms")
        if roof:
            parts.append(f"roofline {100 * roof / (med * 1e3):.0f}%")
        tr.write_line(f"{name:<45} " + ", ".join(parts))
