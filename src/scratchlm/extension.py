"""Our C++ files (csrc/), compiled on first use with torch.utils.cpp_extension.

Each is built once per machine (``-O3 -march=native``: AVX-512 where the CPU has it; under a
minute) and cached under torch's extension directory (e.g. ``~/.cache/torch_extensions``).
Where it cannot be built (no compiler, no headers) or its environment switch is set, ``build``
returns None, warned once, and the callers keep PyTorch's own kernels: the same results,
slower. cpu_gemv.py (decoding's matrix-vector kernels) and fused_ops.py (training's small
ops) use it.
"""

from __future__ import annotations

import hashlib
import os
import sys
import warnings
from pathlib import Path

CSRC = Path(__file__).parent / "csrc"
FLAGS = ["-O3", "-march=native", "-mprefer-vector-width=512", "-fopenmp", "-fno-math-errno"]


def cpu_tag(cpuinfo: str = "/proc/cpuinfo") -> str:
    """8 hex digits naming this CPU's instruction sets (Linux: the flags in /proc/cpuinfo).

    -march=native compiles for the CPU it runs on, and torch keys its build cache on the name,
    sources and flags only: a home directory shared by machines with different CPUs (a
    cluster's, or a VM moved to another host) would load a build using instructions this CPU
    lacks and die of SIGILL. One build per instruction set instead."""
    try:
        with open(cpuinfo) as f:
            flags = next((line for line in f if line.startswith("flags")), "")
    except OSError:
        flags = ""
    if not flags:
        import platform

        flags = platform.machine() + platform.processor()
    return hashlib.sha1(" ".join(sorted(flags.split())).encode()).hexdigest()[:8]


def build(name: str, sources: list[str], what: str, switch_off: str, flags: list[str] | None = None):
    """The compiled module ``name`` from csrc/``sources``, or None where it cannot be built or
    the environment variable ``switch_off`` is "1". ``what`` names it in the messages. The
    build is cached per CPU instruction set (``cpu_tag``)."""
    if os.environ.get(switch_off) == "1":
        return None
    name = f"{name}_{cpu_tag()}"
    try:
        from torch.utils.cpp_extension import _get_build_directory, load

        if not (Path(_get_build_directory(name, verbose=False)) / f"{name}.so").exists():
            print(f"scratchlm: compiling {what}, once for this machine (under a minute)", file=sys.stderr, flush=True)
        return load(name=name, sources=[str(CSRC / s) for s in sources], extra_cflags=flags or FLAGS, verbose=False)
    except Exception as e:  # no compiler, no headers: PyTorch's own kernels still work
        warnings.warn(f"scratchlm's {what} could not be built ({type(e).__name__}: "
                      f"{str(e).splitlines()[0] if str(e) else ''}); using PyTorch's slower kernels", stacklevel=3)
        return None


__all__ = ["build", "cpu_tag", "FLAGS", "CSRC"]
