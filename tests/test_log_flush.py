"""moeq's log flush at exit (scripts/llama-cpp/moeq-log-flush.cpp): preloaded into every llama-* tool moeq runs,
named in the toolchain's identity, and changing nothing but logging: the quantized bytes equal those of the same
binaries run without it."""

from __future__ import annotations

import concurrent.futures
import hashlib
import subprocess
from pathlib import Path

import pytest

from moeq.runner import LOG_FLUSH_LIBRARY, log_flush_library, run_tool, tool_env
from moeq.toolchain import TOOLS, Toolchain, pinned_bin_dir

from conftest import REPO

CALIBRATION = REPO / "moeq" / "data" / "calibration.txt"


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture(scope="module")
def unchanged(tmp_path_factory) -> Toolchain:
    """The same binaries, linked from a folder without the library beside them: llama.cpp as built."""
    folder = tmp_path_factory.mktemp("unchanged")
    for name in TOOLS:
        (folder / name).symlink_to(pinned_bin_dir() / name)
    return Toolchain(folder)


def test_the_pinned_tools_carry_the_flush_and_say_so(toolchain, unchanged):
    library = pinned_bin_dir() / LOG_FLUSH_LIBRARY
    for name in TOOLS:
        build = toolchain.tool(name).build
        if name.startswith("llama-"):
            assert build.log_flush == sha256(library) and tool_env(toolchain.path(name))["LD_PRELOAD"] == str(library)
            assert build.describe() == "llama.cpp 0c1e570 with moeq's log flush at exit"
        else:  # ggml-rpc-server logs through ggml alone, with no logger thread
            assert build.log_flush is None and "LD_PRELOAD" not in tool_env(toolchain.path(name))
        assert unchanged.tool(name).build.log_flush is None and log_flush_library(unchanged.path(name)) is None
    assert unchanged.tool("llama-quantize").build.describe() == "llama.cpp 0c1e570"
    stamp = (pinned_bin_dir().parent / ".moeq-build-complete").read_text()
    source = REPO / "scripts" / "llama-cpp" / "moeq-log-flush.cpp"
    assert f"log_flush={LOG_FLUSH_LIBRARY} sha256:{sha256(source)}\n" in stamp


def test_the_library_calls_nothing_of_llama_cpp_but_its_logger(toolchain):
    """What the preloaded library can change: it calls llama.cpp's common_log_main and common_log_pause, and
    nothing else of llama.cpp or ggml."""
    library = pinned_bin_dir() / LOG_FLUSH_LIBRARY
    undefined = subprocess.run(["nm", "-D", "--undefined-only", str(library)], capture_output=True, text=True,
                               check=True).stdout.split()
    called = sorted(s for s in undefined if not s.startswith(("_ITM_", "__cxa_", "__gmon_")) and len(s) > 1)
    assert called == ["_Z15common_log_mainv", "_Z16common_log_pauseP10common_log"]


def test_quantized_bytes_equal_the_unchanged_tools(tmp_path, toolchain, unchanged, tiny_model):
    """A Q4_K_M and a Q2_K with an importance matrix, by the tools as moeq runs them and by the same binaries
    without the flush: the same sha256. The importance matrix too."""
    files = {}
    for label, chain in (("flush", toolchain), ("unchanged", unchanged)):
        folder = tmp_path / label
        matrix = folder / "tiny.imatrix"
        run_tool([str(chain.path("llama-imatrix")), "-m", str(tiny_model), "-f", CALIBRATION.name, "-o", str(matrix),
                  "-c", "128", "--chunks", "4", "--output-frequency", "1000000", "-t", "2"], folder / "imatrix.log",
                 cwd=CALIBRATION.parent)
        files[label, "imatrix"] = sha256(matrix)
        for qtype in ("Q4_K_M", "Q2_K"):
            out = folder / f"{qtype}.gguf"
            # the matrix by its bare name, as moeq passes it: llama-quantize writes the name into the file
            run_tool([str(chain.path("llama-quantize")), "--imatrix", matrix.name, str(tiny_model), out.name, qtype],
                     folder / f"{qtype}.log", cwd=folder)
            files[label, qtype] = sha256(out)
    for what in ("imatrix", "Q4_K_M", "Q2_K"):
        assert files["flush", what] == files["unchanged", what], what


def test_the_log_is_whole_at_exit(tmp_path, toolchain, tiny_model):
    """llama-completion's memory breakdown, the last lines it logs, is in the log of every run, two at a time (the
    unchanged tools lose it in some runs under load: benchmarks/log_tail.py)."""
    def run(i: int) -> list[str]:
        lines: list[str] = []
        run_tool([str(toolchain.path("llama-completion")), "-m", str(tiny_model), "-p", "hi", "-n", "2", "-no-cnv",
                  "-c", "256", "-t", "1", "-v"], tmp_path / f"{i}.log", on_line=lines.append)
        return lines

    with concurrent.futures.ThreadPoolExecutor(max_workers=2) as pool:
        for lines in pool.map(run, range(10)):
            assert any("memory_breakdown_print" in line and "Host" in line for line in lines), lines[-3:]
