"""Building and loading the compiled CPU operators (`cpu/*.h`, `cpu/ops.cpp`): once per machine,
per instruction-set variant, cached.

`torch.utils.cpp_extension` compiles them with the machine's C++ compiler (g++; ninja from the
`ninja` package) the first time a process needs them, into torch's extension cache
(`TORCH_EXTENSIONS_DIR`, default `~/.cache/torch_extensions`); later processes load the cached
library. `C5SNN_ISA` picks the instruction-set variant to build: `native` (this CPU's, the
default), `avx2` (x86-64-v3: AVX2 and FMA, no AVX-512) or `scalar` (x86-64: SSE2 only, no FMA),
so that one machine can build and test the lower variants too. The library's name hashes the
sources, the flags, torch's version and, for `native`, this CPU's instruction-set flags: a cache
shared by machines never hands one another's build. A build lock left by a build killed midway
is cleared after 5 minutes (torch would wait for it forever), and a cached library that fails
to load is rebuilt once.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import platform
import shutil
import subprocess
import sys
import time
from pathlib import Path

import torch

from c5snn.errors import first_line
from c5snn.files import atomic_path

SOURCES = Path(__file__).with_name("cpu")
ISA_SWITCH = "C5SNN_ISA"
# -ffp-contract=off: no fused multiply-add where the source does not ask for one, so the LIF's
# arithmetic rounds as the torch path's. -fopenmp: ATen's parallel_for is inline and runs
# serially unless the extension is built with OpenMP; linked, it shares torch's libgomp.
ISA_FLAGS = {"native": "-march=native", "avx2": "-march=x86-64-v3", "scalar": "-march=x86-64"}
CFLAGS = ["-O3", "-ffp-contract=off", "-fopenmp"]
LDFLAGS = ["-fopenmp"]
STALE_LOCK_S = 300.0


class BuildError(RuntimeError):
    """The operators could not be built or loaded here."""


def isa_variant() -> str:
    """`C5SNN_ISA`, checked: native (default), avx2 or scalar."""
    variant = os.environ.get(ISA_SWITCH, "native").strip().lower() or "native"
    if variant not in ISA_FLAGS:
        raise BuildError(f"{ISA_SWITCH}={variant!r} is not one of {', '.join(ISA_FLAGS)}")
    return variant


def _cpu_flags() -> str:
    """This CPU's instruction-set flags (what -march=native compiles for)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                return line
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _sources() -> list[Path]:
    return sorted(SOURCES.iterdir())


def library_name(variant: str) -> str:
    """The build's name: one per (sources, flags, torch version, variant and, for native, CPU)."""
    digest = hashlib.sha256()
    for path in _sources():
        digest.update(path.name.encode() + path.read_bytes())
    flags = [ISA_FLAGS[variant], *CFLAGS, *LDFLAGS]
    digest.update(" ".join(flags).encode() + torch.__version__.encode())
    if variant == "native":
        digest.update(_cpu_flags().encode())
    return f"c5snn_{variant}_{digest.hexdigest()[:16]}"


def build_directory(variant: str) -> Path:
    """Where this machine's build of a variant lives (torch's extension cache)."""
    cache = os.environ.get("TORCH_EXTENSIONS_DIR") or Path.home() / ".cache" / "torch_extensions"
    return Path(cache) / library_name(variant)


def load(variant: str) -> Path:
    """Load the cached build of `variant`, or build it (a damaged one is rebuilt once);
    returns its folder. Raises BuildError with the compiler's or loader's first line."""
    if shutil.which("ninja") is None:  # the venv's ninja, when the venv is not activated
        os.environ["PATH"] = os.path.dirname(sys.executable) + os.pathsep + os.environ["PATH"]
    root = build_directory(variant)
    cached = (root / f"{root.name}.so").exists()
    if not cached:
        print(f"c5snn: building the compiled CPU kernels ({variant}) into {root} "
              "(once per machine) ...", file=sys.stderr, flush=True)
    try:
        _compile(root, variant)
    except Exception as exc:
        if not cached:
            raise BuildError(first_line(exc)) from None
        # A cached library that does not load (damaged on disk): rebuild it from scratch, in a
        # fresh process, since torch builds an extension at most once per process.
        print(f"c5snn: the cached build in {root} does not load; rebuilding it ...",
              file=sys.stderr, flush=True)
        shutil.rmtree(root, ignore_errors=True)
        rebuilt = subprocess.run(
            [sys.executable, "-c", f"from c5snn.kernels import build; build.load({variant!r})"],
            capture_output=True, text=True)
        if rebuilt.returncode != 0:
            raise BuildError((rebuilt.stderr.strip().splitlines() or ["rebuild failed"])[-1]) from None
        torch.ops.load_library(str(root / f"{root.name}.so"))
    return root


def _compile(root: Path, variant: str) -> None:
    from torch.utils import cpp_extension

    root.mkdir(parents=True, exist_ok=True)
    # torch's build lock is a file that a build killed midway leaves behind, and torch would
    # wait for it forever; a build takes seconds, so a lock this old has no owner.
    lock = root / "lock"
    with contextlib.suppress(OSError):
        if time.time() - lock.stat().st_mtime > STALE_LOCK_S:
            lock.unlink()
    # Compile copies kept beside the build: every checkout with these sources (the name hashes
    # them) then shares one build, where the checkout's own paths would make ninja rebuild.
    for path in _sources():
        copy = root / path.name
        if not copy.exists() or copy.read_bytes() != path.read_bytes():
            with atomic_path(copy) as tmp:
                tmp.write_bytes(path.read_bytes())
    # copies of the flag lists: torch appends to those it is given
    cpp_extension.load(name=root.name, sources=[str(root / "ops.cpp")],
                       extra_cflags=[ISA_FLAGS[variant], *CFLAGS], extra_ldflags=list(LDFLAGS),
                       build_directory=str(root), is_python_module=False, verbose=False)
