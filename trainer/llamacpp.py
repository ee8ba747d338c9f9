"""llama.cpp at one pinned version: its GGUF converter, its quantize tool and llama-cpp-python as the GGUF runtime.

Contract
--------
* :data:`VERSION` is the llama-cpp-python release whose PyPI sdist vendors llama.cpp. Everything GGUF comes from it:
  ``convert_hf_to_gguf.py`` (with its own ``gguf-py``, so a newer ``gguf`` on PyPI cannot change the output), the
  ``llama-quantize`` tool (k-quants such as ``Q4_K_M``) and the ``llama_cpp`` Python binding that loads and runs a
  GGUF file. Nothing here is a hand-written GGUF writer.
* The tool lives in ``$TUNELOOP_LLAMA_CPP``, else ``<model cache>/../tools/llama.cpp-<VERSION>`` (beside the model
  cache, shared by every tuneloop home on the machine): ``src/`` (the unpacked sdist) and ``build/bin/``
  (``libllama.so``, the ggml libraries and ``llama-quantize``, one cmake + ninja build of the vendored tree for this
  CPU). The binding runs from ``src/`` with ``LLAMA_CPP_LIB_PATH`` pointing at ``build/bin`` — one compile serves
  both the tool and the runtime.
* :func:`locate` returns the built :class:`LlamaCpp` or None; :func:`ensure` builds it when missing (downloading the
  sdist with pip from the package index when it is not already in ``src/``), printing each step; a build that fails
  raises :class:`ToolError` with the log's tail and leaves no half-built tool behind (it builds in a temporary
  folder, then renames). ``make setup EXPORT=1`` and ``tuneloop export tools`` call it ahead of time.
* :meth:`LlamaCpp.python_env` is the environment of a subprocess that imports ``llama_cpp``.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from tuneloop.errors import UserError

VERSION = "0.3.36"
SDIST = f"llama_cpp_python-{VERSION}"
#: cmake options: only the shared libraries and the quantize tool, tuned for this CPU, no network features
CMAKE_OPTIONS = (
    "-DCMAKE_BUILD_TYPE=Release",
    "-DBUILD_SHARED_LIBS=ON",
    "-DLLAMA_BUILD_TESTS=OFF",
    "-DLLAMA_BUILD_EXAMPLES=OFF",
    "-DLLAMA_BUILD_SERVER=OFF",
    "-DLLAMA_BUILD_APP=OFF",
    "-DLLAMA_BUILD_TOOLS=ON",
    "-DLLAMA_OPENSSL=OFF",
    "-DGGML_NATIVE=OFF",  # the portable AVX2 build (AVX, AVX2, FMA, F16C, BMI2): a native build on an AMX machine
    # crashed on q8_0 tensors, and AVX2 is what the machines this runs on have in common
    "-DCMAKE_BUILD_RPATH_USE_ORIGIN=ON",  # the libraries find each other after the build folder is moved
)
TARGETS = ("llama", "llama-quantize")


class ToolError(UserError):
    """llama.cpp could not be fetched or built (the message says what to do)."""


@dataclass(frozen=True)
class LlamaCpp:
    root: Path

    @property
    def src(self) -> Path:
        return self.root / "src"

    @property
    def vendor(self) -> Path:
        return self.src / "vendor" / "llama.cpp"

    @property
    def converter(self) -> Path:
        return self.vendor / "convert_hf_to_gguf.py"

    @property
    def lora_converter(self) -> Path:
        return self.vendor / "convert_lora_to_gguf.py"

    @property
    def bin(self) -> Path:
        return self.root / "build" / "bin"

    @property
    def quantize(self) -> Path:
        return self.bin / "llama-quantize"

    def python_env(self) -> dict[str, str]:
        """Environment of a subprocess that imports ``llama_cpp`` (the binding from ``src/``, the library built here)."""
        path = os.pathsep.join(p for p in (str(self.src), os.environ.get("PYTHONPATH", "")) if p)
        return {**self.tool_env(), "PYTHONPATH": path, "LLAMA_CPP_LIB_PATH": str(self.bin)}

    def tool_env(self) -> dict[str, str]:
        """Environment of the built tools: the libraries beside them come first on the loader's path."""
        libs = os.pathsep.join(p for p in (str(self.bin), os.environ.get("LD_LIBRARY_PATH", "")) if p)
        return {**os.environ, "LD_LIBRARY_PATH": libs}

    def converter_env(self) -> dict[str, str]:
        """Environment of the converters: their own vendored ``gguf-py`` wins over the installed ``gguf``."""
        path = os.pathsep.join(p for p in (str(self.vendor / "gguf-py"), os.environ.get("PYTHONPATH", "")) if p)
        return {**os.environ, "PYTHONPATH": path, "NO_LOCAL_GGUF": ""}


def tool_root(models_path: Path) -> Path:
    """Where the tool lives (see module doc)."""
    env = os.environ.get("TUNELOOP_LLAMA_CPP")
    return Path(env).expanduser().resolve() if env else models_path.parent / "tools" / f"llama.cpp-{VERSION}"


def locate(models_path: Path) -> LlamaCpp | None:
    t = LlamaCpp(tool_root(models_path))
    ok = t.converter.is_file() and t.quantize.is_file() and any(t.bin.glob("libllama.so*"))
    return t if ok else None


def ensure(models_path: Path, say: Callable[[str], None] = print) -> LlamaCpp:
    """The built tool, building it first when missing (see module doc)."""
    found = locate(models_path)
    if found is not None:
        return found
    root = tool_root(models_path)
    for exe in ("cmake", "ninja"):
        if shutil.which(exe) is None:
            raise ToolError(
                f"building llama.cpp needs {exe}: install it (Debian: apt-get install cmake ninja-build g++)"
            )
    root.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".llama.cpp-{VERSION}-", dir=root.parent))
    try:
        t0 = time.monotonic()
        src = _unpack(tmp, say)
        build = tmp / "build"
        say(f"llama.cpp {VERSION}: building {', '.join(TARGETS)} for this CPU (a few minutes, once) ...")
        _run(["cmake", "-S", str(src / "vendor" / "llama.cpp"), "-B", str(build), "-G", "Ninja", *CMAKE_OPTIONS], tmp)
        jobs = str(max(1, os.cpu_count() or 1))
        _run(["cmake", "--build", str(build), "--target", *TARGETS, "-j", jobs], tmp)
        shutil.rmtree(build / "CMakeFiles", ignore_errors=True)  # objects: hundreds of MB the tool does not need
        if root.exists():
            shutil.rmtree(root)
        tmp.rename(root)
        say(f"llama.cpp {VERSION}: built in {time.monotonic() - t0:.0f} s into {root}")
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    built = locate(models_path)
    if built is None:
        raise ToolError(f"llama.cpp {VERSION} was built into {root}, but its library or llama-quantize is missing")
    return built


def _unpack(dest: Path, say: Callable[[str], None]) -> Path:
    say(f"llama.cpp {VERSION}: downloading the llama-cpp-python sdist (77 MB) from the package index ...")
    _run(
        [sys.executable, "-m", "pip", "download", "-q", "--no-deps", "--no-binary", ":all:", "-d", str(dest)]
        + [f"llama-cpp-python=={VERSION}"],
        dest,
    )
    archive = dest / f"{SDIST}.tar.gz"
    with tarfile.open(archive) as tf:
        tf.extractall(dest, filter="data")
    (dest / SDIST).rename(dest / "src")
    return dest / "src"


def _run(cmd: list[str], where: Path) -> None:
    log = where / "build.log"
    with log.open("a") as f:
        f.write("$ " + " ".join(cmd) + "\n")
        f.flush()
        r = subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT)
    if r.returncode != 0:
        tail = log.read_text()[-3000:]
        raise ToolError(f"llama.cpp {VERSION}: `{' '.join(cmd[:3])} ...` failed (exit {r.returncode}):\n{tail}")
