"""Build and load the native engine's C++ CPU kernels (`cpu_*.cpp`) at first use.

Each kernel is one C++ file with a plain C interface, compiled with the system's C++ compiler
(`CXX`, else g++, else c++) for the machine it runs on (-march=native) into the user's cache
(`$XDG_CACHE_HOME/alignserve/kernels`, else ~/.cache/...; keyed by source, compiler, flags and
CPU, so a shared home never hands one CPU another's build), and loaded with ctypes: no torch
headers, a build takes ~2 s. OpenMP is linked by soname, so a kernel shares the thread pool
torch already loaded. Where no compiler is found or the build fails, `load` returns None (and
logs why, once): callers keep torch's ops.
"""

from __future__ import annotations

import ctypes
import hashlib
import logging
import os
import shutil
import subprocess
import tempfile
from pathlib import Path

log = logging.getLogger(__name__)

FLAGS = ("-O3", "-march=native", "-std=c++17", "-fopenmp", "-shared", "-fPIC")
_loaded: dict[Path, ctypes.CDLL | None] = {}


def enabled(variable: str) -> bool:
    """Whether the environment leaves a kernel on: off where `variable` is off / 0 / false
    (read at each call, so that benchmarks can compare both ways in one process)."""
    return os.environ.get(variable, "on").strip().lower() not in ("off", "0", "false")


def compiler() -> str | None:
    """The C++ compiler to build with: $CXX, else g++, else c++ (None: none on PATH)."""
    for name in (os.environ.get("CXX"), "g++", "c++"):
        if name and shutil.which(name):
            return name
    return None


def _cpu_key() -> str:
    """What -march=native depends on: the CPU's model and flags."""
    try:
        lines = Path("/proc/cpuinfo").read_text().splitlines()
    except OSError:
        return "unknown"
    return "\n".join([ln for ln in lines if ln.startswith(("model name", "flags"))][:2])


def cache_dir() -> Path:
    """$XDG_CACHE_HOME/alignserve/kernels (else ~/.cache/...), or a folder of this user's under
    the temporary directory where that cannot be created (a read-only home)."""
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    folder = Path(base) / "alignserve" / "kernels"
    try:
        folder.mkdir(parents=True, exist_ok=True)
        return folder
    except OSError:
        return Path(tempfile.gettempdir()) / f"alignserve-kernels-{os.getuid()}"


def build(source: Path, cxx: str) -> Path:
    """Compile `source` (or find it already compiled) and return the library's path."""
    version = subprocess.run([cxx, "--version"], capture_output=True, text=True, timeout=30,
                             check=False).stdout
    key = hashlib.sha256("\0".join((source.read_text(), version, " ".join(FLAGS), _cpu_key()))
                         .encode()).hexdigest()[:16]
    target = cache_dir() / f"{source.stem}-{key}.so"
    if target.exists():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    # Build beside the target, then rename: processes building at once never load a half file.
    fd, tmp = tempfile.mkstemp(suffix=".so", dir=target.parent)
    os.close(fd)
    try:
        done = subprocess.run([cxx, *FLAGS, str(source), "-o", tmp], capture_output=True,
                              text=True, timeout=300, check=False)
        if done.returncode != 0:
            raise RuntimeError(f"{cxx} failed: {done.stderr.strip()[-2000:]}")
        os.replace(tmp, target)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return target


def load(source: Path, version_symbol: str, version: int) -> ctypes.CDLL | None:
    """The kernel library of `source`, built on first call, whose `version_symbol()` returns
    `version`; None (logged once) where it cannot be built or loaded."""
    if source in _loaded:
        return _loaded[source]
    lib = None
    cxx = compiler()
    if cxx is None:
        log.warning("no C++ compiler (CXX, g++, c++) on PATH: %s is not built, torch's ops "
                    "serve instead", source.name)
    else:
        try:
            lib = ctypes.CDLL(str(build(source, cxx)))
            if getattr(lib, version_symbol)() != version:
                raise RuntimeError("the built library is of another version")
        except (OSError, RuntimeError, AttributeError, subprocess.SubprocessError) as exc:
            log.warning("%s could not be built (%s): torch's ops serve instead", source.name, exc)
            lib = None
    _loaded[source] = lib
    return lib
