"""Find the llama.cpp tools moeq shells out to, and report which build they are.

Each tool is looked up in this order: `toolchain.llama_cpp_bin` from pipeline.yaml, the
MOEQ_LLAMA_CPP_BIN environment variable, the pinned builds in the cache (`$MOEQ_CACHE_DIR/llama.cpp/
<commit>-cuda/bin`, then the CPU build `<commit>/bin`; default cache `~/.cache/moeq`), then PATH.
The backend a tool was built with (cpu, cuda, ...) is read from the ggml libraries beside it;
`Toolchain(backend="cuda")` (toolchain.backend in pipeline.yaml) refuses tools of any other.

    chain = Toolchain()
    chain.tool("llama-quantize").build.commit
    # -> '0c1e570'
    chain.tool("llama-bench").build.backend
    # -> 'cpu'
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
from dataclasses import asdict, dataclass, fields, replace
from pathlib import Path

from moeq.errors import ToolError
from moeq.runner import log_flush_library
from moeq.workspace import sha256_file, write_json_atomic

PINNED_COMMIT = "0c1e570"
PINNED_SDIST = "llama-cpp-python==0.3.36"
TOOLS = (
    "llama-quantize", "llama-gguf-split", "llama-bench", "llama-perplexity",
    "llama-imatrix", "llama-completion", "llama-server", "ggml-rpc-server",
)
# These two have no --version; each is checked by its usage text and takes the build
# reported by a sibling tool of the same folder (one build makes them all).
NO_VERSION_FLAG = {
    "llama-quantize": (["--help"], "allowed quantization types"),
    "ggml-rpc-server": (["--help"], "--port"),
}
VERSION_SIBLINGS = ("llama-gguf-split", "llama-completion", "llama-bench")
FIX_HINT = "run scripts/setup, or set MOEQ_LLAMA_CPP_BIN to a folder holding the llama.cpp binaries"
# ggml's offload backends, each built as libggml-<name>.so beside the tools (or linked into them).
GPU_BACKENDS = ("cuda", "hip", "musa", "vulkan", "sycl", "metal", "opencl", "cann")
BACKENDS = ("cpu", *GPU_BACKENDS)

_VERSION_RE = re.compile(r"version:\s*(?P<version>\S+)\s*\(build\s*(?P<build>[^,]+),\s*commit\s*(?P<commit>\w+)\)")
_BUILT_WITH_RE = re.compile(r"built with\s+(?P<compiler>.+?)\s+for\s+(?P<target>\S+)")


def cache_dir() -> Path:
    return Path(os.environ.get("MOEQ_CACHE_DIR") or Path.home() / ".cache" / "moeq")


def pinned_dir(backend: str = "cpu") -> Path:
    """The pinned build of one backend: `<commit>` for the CPU, `<commit>-<backend>` for the others."""
    return cache_dir() / "llama.cpp" / (PINNED_COMMIT if backend == "cpu" else f"{PINNED_COMMIT}-{backend}")


def pinned_bin_dir(backend: str = "cpu") -> Path:
    return pinned_dir(backend) / "bin"


def pinned_src_dir() -> Path:
    """The llama.cpp source tree of the pinned build (convert_hf_to_gguf.py, gguf-py); every build has one."""
    return next((pinned_dir(b) / "src" for b in ("cpu", "cuda") if (pinned_dir(b) / "src").is_dir()),
                pinned_dir() / "src")


def detect_backend(tool: Path) -> str:
    """The offload backend `tool` was built with: from the libggml-<backend>.so files beside it (or in
    ../lib), else from the backend's registration symbol in a statically linked binary; "cpu" if none."""
    real = tool.resolve()
    for folder in (real.parent, real.parent.parent / "lib"):
        for backend in GPU_BACKENDS:
            if any(folder.glob(f"libggml-{backend}.so*")) or (folder / f"libggml-{backend}.dylib").exists():
                return backend
    try:
        data = real.read_bytes()
    except OSError:
        return "cpu"
    return next((b for b in GPU_BACKENDS if f"ggml_backend_{b}_reg".encode() in data), "cpu")


@dataclass(frozen=True)
class ToolBuild:
    version: str
    build: str
    commit: str
    compiler: str
    target: str
    backend: str = "cpu"
    log_flush: str | None = None  # sha256 of moeq's log flush library preloaded into the tool; None: none

    @property
    def pinned(self) -> bool:
        return self.commit.startswith(PINNED_COMMIT) or PINNED_COMMIT.startswith(self.commit)

    def describe(self) -> str:
        """'llama.cpp 0c1e570 with moeq's log flush at exit', as the card and doctor say it."""
        return f"llama.cpp {self.commit}" + (" with moeq's log flush at exit" if self.log_flush else "")

    def as_dict(self) -> dict[str, str]:
        return asdict(self)


@dataclass(frozen=True)
class Tool:
    name: str
    path: Path
    found_via: str  # config, env, cache or PATH
    build: ToolBuild

    def as_dict(self) -> dict:
        return {"name": self.name, "path": str(self.path), "found_via": self.found_via, **self.build.as_dict()}


def log_flush_id(tool: Path) -> str | None:
    """The sha256 of the log flush library moeq preloads into `tool` (moeq.runner), None where it has none."""
    library = log_flush_library(tool)
    return sha256_file(library) if library is not None else None


def parse_version(text: str) -> ToolBuild | None:
    """Parse `--version` output: 'version: 0.5.0-dev (build 1, commit 0c1e570)' + 'built with ...'."""
    match = _VERSION_RE.search(text)
    if not match:
        return None
    built = _BUILT_WITH_RE.search(text)
    return ToolBuild(
        version=match["version"], build=match["build"].strip(), commit=match["commit"],
        compiler=built["compiler"] if built else "unknown", target=built["target"] if built else "unknown",
    )


class ProbeCache:
    """Tool builds already probed, by (path, size, mtime): a run with nothing to do starts no tool."""

    def __init__(self, path: Path):
        self.path = path
        try:
            self._entries: dict[str, dict] = json.loads(path.read_text())
        except (OSError, ValueError):
            self._entries = {}

    @staticmethod
    def _key(tool: Path) -> str:
        st = tool.stat()
        return f"{tool.resolve()}|{st.st_size}|{st.st_mtime_ns}"

    def get(self, tool: Path) -> ToolBuild | None:
        entry = self._entries.get(self._key(tool))
        if not entry or set(entry) != {f.name for f in fields(ToolBuild)}:  # none, or from an older moeq
            return None
        return ToolBuild(**entry)

    def put(self, tool: Path, build: ToolBuild) -> None:
        self._entries[self._key(tool)] = build.as_dict()
        try:
            write_json_atomic(self.path, self._entries, indent=1)
        except OSError:
            pass  # a cache that cannot be written only costs a probe next time


class Toolchain:
    """Resolves and probes llama.cpp tools once per process, and remembers probes across runs.

    `fresh=True` (moeq doctor) probes every tool again instead of trusting the remembered builds;
    `backend` (toolchain.backend) makes a tool of another backend an error."""

    def __init__(self, configured_bin: Path | None = None, fresh: bool = False, backend: str | None = None):
        self.configured_bin = Path(configured_bin) if configured_bin else None
        self.backend = backend
        self._tools: dict[str, Tool] = {}
        self._probes = None if fresh else ProbeCache(cache_dir() / "tool-probes.json")

    def candidates(self, name: str) -> list[tuple[str, Path]]:
        """Where `name` is looked for, in order, as (found_via, path)."""
        places: list[tuple[str, Path]] = []
        if self.configured_bin:
            places.append(("config", self.configured_bin / name))
        env_bin = os.environ.get("MOEQ_LLAMA_CPP_BIN")
        if env_bin:
            places.append(("env", Path(env_bin) / name))
        cached = [self.backend] if self.backend else ["cuda", "cpu"]
        places += [("cache", pinned_bin_dir(backend) / name) for backend in cached
                   if backend == cached[-1] or pinned_bin_dir(backend).is_dir()]
        on_path = shutil.which(name)
        places.append(("PATH", Path(on_path) if on_path else Path(f"$PATH/{name}")))
        return places

    def locate(self, name: str) -> tuple[str, Path]:
        if name not in TOOLS:
            raise ToolError(name, "not a llama.cpp tool moeq uses", f"name one of {', '.join(TOOLS)}")
        places = self.candidates(name)
        for found_via, path in places:
            if path.is_file() and os.access(path, os.X_OK):
                return found_via, path
        looked = ", ".join(str(p) if via != "PATH" else "PATH" for via, p in places)
        hint = FIX_HINT if not self.backend else (
            f"toolchain.backend is {self.backend}: run scripts/setup --backend {self.backend}, or point "
            f"toolchain.llama_cpp_bin at a folder holding a {self.backend.upper()} build")
        raise ToolError(name, f"not found (looked in {looked})", hint)

    def tool(self, name: str) -> Tool:
        if name not in self._tools:
            found_via, path = self.locate(name)
            build = self._probes.get(path) if self._probes else None
            if build is None:
                if name in NO_VERSION_FLAG:
                    args, marker = NO_VERSION_FLAG[name]
                    check_runs(name, path, args, marker)
                    build = self._sibling_build(path.parent)
                else:
                    build = probe_build(name, path)
                build = replace(build, backend=detect_backend(path))
                if self._probes and build.commit != "unknown":
                    self._probes.put(path, build)
            build = replace(build, log_flush=log_flush_id(path))  # not remembered: the library can come later
            if self.backend and build.backend != self.backend:
                raise ToolError(name, f"{path} is a {build.backend.upper()} build of llama.cpp, and toolchain.backend "
                                f"asks for {self.backend.upper()}", "build it with scripts/setup --backend "
                                f"{self.backend} (or point toolchain.llama_cpp_bin at a {self.backend.upper()} build)")
            self._tools[name] = Tool(name, path, found_via, build)
        return self._tools[name]

    def _sibling_build(self, folder: Path) -> ToolBuild:
        for sibling in VERSION_SIBLINGS:
            candidate = folder / sibling
            if candidate.is_file() and os.access(candidate, os.X_OK):
                return probe_build(sibling, candidate)
        return ToolBuild("unknown", "unknown", "unknown", "unknown", "unknown")

    def path(self, name: str) -> Path:
        return self.tool(name).path


def _run_probe(name: str, path: Path, args: list[str]) -> subprocess.CompletedProcess:
    try:
        return subprocess.run([str(path), *args], capture_output=True, text=True, timeout=30,
                              errors="replace", stdin=subprocess.DEVNULL)
    except subprocess.TimeoutExpired:
        raise ToolError(name, f"{path} {' '.join(args)} did not answer in 30 s", FIX_HINT) from None
    except OSError as exc:
        raise ToolError(name, f"{path} cannot run ({exc.strerror})", FIX_HINT) from None


def _last_line(text: str) -> str:
    return next((line.strip() for line in reversed(text.splitlines()) if line.strip()), "no output")[:160]


def check_runs(name: str, path: Path, args: list[str], marker: str) -> None:
    """A tool without --version: it must start and print its usage text."""
    proc = _run_probe(name, path, args)
    output = proc.stdout + proc.stderr
    if marker not in output:
        raise ToolError(name, f"{path} does not start properly ({_last_line(output)})", FIX_HINT)


def probe_build(name: str, path: Path) -> ToolBuild:
    """Run `TOOL --version` and parse it; a tool that cannot say its build is broken."""
    proc = _run_probe(name, path, ["--version"])
    output = proc.stdout + proc.stderr
    build = parse_version(output)
    if build is None:
        raise ToolError(name,
                        f"{path} --version exited {proc.returncode} without a version line ({_last_line(output)})",
                        FIX_HINT)
    return build
