"""The CUDA build on a machine without one: configure arguments, backend detection, doctor's warnings, the
bench's refusal of a CPU-only build where an NVIDIA GPU is present, and the GPU named in the card.

A GPU is made visible the way moeq looks for one: an `nvidia-smi` first on PATH. A CUDA build is the real
pinned tools copied into a folder that also holds a `libggml-cuda.so`, as a CUDA build's folder does."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
from pathlib import Path

import pytest

from moeq.cards.facts.measured import offload_device
from moeq.config import load_pipeline
from moeq.errors import ToolError
from moeq.llama_logs import parse_buffer_sizes, parse_memory_breakdown
from moeq.records import BenchRecord, DeviceMemory, Gpu
from moeq.toolchain import PINNED_COMMIT, TOOLS, Toolchain, detect_backend

from conftest import REPO, quick_imatrix, run_moeq

BUILD = REPO / "scripts" / "build-llama-cpp"
H200 = "NVIDIA H200, 143771, 9.0"


def fake_nvidia_smi(folder: Path, gpus: list[str] | None) -> Path:
    """An nvidia-smi answering the queries moeq and build-llama-cpp make ("name, MiB, compute capability"
    per GPU); None: one that fails, as on a machine with the tool but no working driver."""
    folder.mkdir(parents=True, exist_ok=True)
    script = folder / "nvidia-smi"
    if gpus is None:
        script.write_text("#!/bin/sh\necho 'NVIDIA-SMI has failed' >&2\nexit 9\n")
    else:
        names = "\n".join(", ".join(g.split(", ")[:2]) for g in gpus)
        caps = "\n".join(g.split(", ")[2] for g in gpus)
        script.write_text(f"#!/bin/sh\ncase \"$*\" in\n  *compute_cap*) printf '%s\\n' '{caps}' ;;\n"
                          f"  *) printf '%s\\n' '{names}' ;;\nesac\n")
    script.chmod(0o755)
    return folder


def path_with(folder: Path) -> str:
    return f"{folder}:{os.environ['PATH']}"


@pytest.fixture(scope="module")
def cuda_tools(tmp_path_factory, toolchain) -> Path:
    """The pinned tools in a folder laid out as a CUDA build's (libggml-cuda.so beside them)."""
    folder = tmp_path_factory.mktemp("cuda-build") / "bin"
    folder.mkdir()
    source = toolchain.path("llama-bench").parent
    for item in source.iterdir():
        if item.name.startswith("lib"):
            (folder / item.name).symlink_to(item.resolve())
        else:
            shutil.copy2(item, folder / item.name)
    (folder / "libggml-cuda.so.0").write_bytes(b"")
    (folder / "libggml-cuda.so").symlink_to("libggml-cuda.so.0")
    return folder


def print_config(*args: str, path: str) -> tuple[int, dict[str, list[str]], str]:
    proc = subprocess.run([str(BUILD), *args, "--print-config"], capture_output=True, text=True,
                          env={**os.environ, "PATH": path, "MOEQ_LLAMA_CPP_BACKEND": ""})
    config: dict[str, list[str]] = {}
    for line in proc.stdout.splitlines():
        key, _, value = line.partition("=")
        config.setdefault(key, []).append(value)
    return proc.returncode, config, proc.stderr


# ---------------------------------------------------------------- build-llama-cpp


def test_cuda_configure_arguments_come_from_the_gpu_found(tmp_path):
    fake_nvcc = tmp_path / "cuda" / "nvcc"
    fake_nvcc.parent.mkdir()
    fake_nvcc.write_text("#!/bin/sh\nexit 0\n")
    fake_nvcc.chmod(0o755)
    smi = fake_nvidia_smi(tmp_path / "smi", ["NVIDIA RTX 4090, 24564, 8.9", H200, H200])
    path = f"{fake_nvcc.parent}:{smi}:{os.environ['PATH']}"
    rc, cuda, err = print_config("--backend", "cuda", path=path)
    assert rc == 0, err
    assert cuda["backend"] == ["cuda"] and cuda["nvcc"] == [str(fake_nvcc)]
    assert cuda["dest"][0].endswith(f"/llama.cpp/{PINNED_COMMIT}-cuda")
    assert cuda["cuda_architectures"] == ["89-real;90-real"]  # each GPU's own, once
    # moeq's log flush at exit is built for the CUDA tools as for the CPU ones, named by its source's sha256
    source = hashlib.sha256((BUILD.parent / "llama-cpp" / "moeq-log-flush.cpp").read_bytes()).hexdigest()
    assert cuda["log_flush"] == [f"libmoeq-log-flush.so sha256:{source} (preloaded into the llama-* tools: moeq's log "
                                 f"flush at exit, {BUILD.parent / 'llama-cpp' / 'moeq-log-flush.cpp'})"]
    args = cuda["cmake_arg"]
    assert {"-DGGML_CUDA=ON", "-DCMAKE_CUDA_ARCHITECTURES=89-real;90-real",
            f"-DCMAKE_CUDA_COMPILER={fake_nvcc}", "-DGGML_RPC=ON", "-DGGML_NATIVE=OFF",
            f"-DLLAMA_BUILD_COMMIT={PINNED_COMMIT}"} <= set(args)
    # The CPU build is the same configuration less CUDA, in a folder of its own.
    rc, cpu, _ = print_config("--backend", "cpu", path=path)
    assert rc == 0 and cpu["dest"][0].endswith(f"/llama.cpp/{PINNED_COMMIT}")
    assert not any("CUDA" in a for a in cpu["cmake_arg"])
    assert set(cpu["cmake_arg"]) <= set(args) and cpu["targets"] == cuda["targets"]
    assert cpu["targets"][0].split() == list(TOOLS)
    # auto: CUDA where nvcc and a GPU are both found; a given architecture wins over the GPU's.
    assert print_config(path=path)[1]["backend"] == ["cuda"]
    assert print_config("--cuda-arch", "90", "--backend", "cuda", path=path)[1]["cuda_architectures"] == ["90"]
    no_gpu = f"{fake_nvcc.parent}:{fake_nvidia_smi(tmp_path / 'broken', None)}:{os.environ['PATH']}"
    assert print_config(path=no_gpu)[1]["backend"] == ["cpu"]


def test_cuda_without_a_gpu_or_an_architecture_is_refused(tmp_path):
    fake_nvcc = tmp_path / "cuda" / "nvcc"
    fake_nvcc.parent.mkdir()
    fake_nvcc.write_text("#!/bin/sh\nexit 0\n")
    fake_nvcc.chmod(0o755)
    path = f"{fake_nvcc.parent}:{fake_nvidia_smi(tmp_path / 'broken', None)}:{os.environ['PATH']}"
    rc, _, err = print_config("--backend", "cuda", path=path)
    assert rc == 1
    assert err == ("build-llama-cpp: error: --backend cuda: nvidia-smi lists no GPU to build for; pass --cuda-arch "
                   "(e.g. 90 for H100/H200, 89 for RTX 4090)\n")
    rc, _, err = print_config("--backend", "rocm", path=path)
    assert rc == 2 and err == "build-llama-cpp: error: --backend 'rocm': use cpu, cuda or auto\n"
    rc, _, err = print_config("--backend", "cuda", "--cuda-arch", "90 && rm -rf /", path=path)
    assert rc == 2 and "--cuda-arch '90 && rm -rf /': give CMake architectures" in err


# ---------------------------------------------------------------- backend detection


def test_backend_is_read_from_the_libraries_beside_the_tools(toolchain, cuda_tools):
    assert detect_backend(toolchain.path("llama-bench")) == "cpu"
    assert detect_backend(cuda_tools / "llama-bench") == "cuda"
    chain = Toolchain(cuda_tools, fresh=True)
    assert {chain.tool(name).build.backend for name in TOOLS} == {"cuda"}
    assert chain.tool("llama-bench").build.commit == PINNED_COMMIT  # the tools themselves are the real ones


def test_a_pipeline_that_asks_for_cuda_refuses_cpu_tools(toolchain, cuda_tools):
    cpu_bin = toolchain.path("llama-quantize").parent
    with pytest.raises(ToolError) as info:
        Toolchain(cpu_bin, backend="cuda", fresh=True).tool("llama-quantize")
    assert str(info.value) == (
        f"llama-quantize: {cpu_bin / 'llama-quantize'} is a CPU build of llama.cpp, and toolchain.backend asks for "
        "CUDA; build it with scripts/setup --backend cuda (or point toolchain.llama_cpp_bin at a CUDA build)")
    assert Toolchain(cuda_tools, backend="cuda", fresh=True).tool("llama-quantize").build.backend == "cuda"
    # The release's pipeline.yaml asks for it, and this machine's cache has no CUDA build: doctor fails on every
    # tool, looking only where a CUDA build would be (the CPU build beside it is not taken instead).
    proc = run_moeq("doctor", "--config", "pipeline.yaml", "--json", env={"PATH": "/usr/bin:/bin"})
    assert proc.returncode == 7
    tools = json.loads(proc.stdout)["tools"]
    cuda_dir = cpu_bin.parent.parent / f"{PINNED_COMMIT}-cuda" / "bin"
    assert [t["detail"] for t in tools] == [
        f"{name}: not found (looked in {cuda_dir / name}, PATH); toolchain.backend is cuda: run scripts/setup "
        "--backend cuda, or point toolchain.llama_cpp_bin at a folder holding a CUDA build" for name in TOOLS]
    assert proc.stderr.splitlines()[-1].startswith(f"error: moeq doctor: found problems with: {', '.join(TOOLS)}")


def test_a_bad_backend_in_the_pipeline_names_the_key(tmp_path):
    config = tmp_path / "pipeline.yaml"
    config.write_text((REPO / "examples" / "tiny-phimoe.yaml").read_text() + "toolchain:\n  backend: rocm\n")
    proc = run_moeq("check-config", "--config", str(config))
    assert proc.returncode == 2
    lines = (REPO / "examples" / "tiny-phimoe.yaml").read_text().count("\n") + 2
    assert proc.stderr == (f"error: {config}:{lines}: toolchain.backend: 'rocm' is not a llama.cpp backend; use one of "
                           "cpu, cuda, hip, musa, vulkan, sycl, metal, opencl, cann (the llama.cpp build the tools must be)\n")


# ---------------------------------------------------------------- doctor


def test_doctor_warns_when_a_gpu_is_present_but_the_tools_are_cpu_only(tmp_path, toolchain):
    smi = fake_nvidia_smi(tmp_path / "smi", [H200])
    proc = run_moeq("doctor", env={"PATH": path_with(smi)})
    assert proc.returncode == 0, proc.stdout + proc.stderr  # a warning: the machine still runs the pipeline
    assert "NVIDIA GPUs: NVIDIA H200 (140.40 GiB)" in proc.stdout
    assert ("warning: this machine has an NVIDIA GPU (NVIDIA H200) but the llama.cpp tools are a CPU build, so the "
            "bench cannot measure GPU offload: build the CUDA tools with scripts/setup --backend cuda (and set "
            "toolchain.backend: cuda in the pipeline)\n") in proc.stdout
    report = json.loads(run_moeq("doctor", "--json", env={"PATH": path_with(smi)}).stdout)
    assert {t["backend"] for t in report["tools"]} == {"cpu"}
    assert report["gpus"] == [{"name": "NVIDIA H200", "memory_bytes": 143771 * 2**20}]
    # Without the GPU, no warning.
    quiet = run_moeq("doctor", env={"PATH": path_with(fake_nvidia_smi(tmp_path / "none", None))})
    assert "warning:" not in quiet.stdout and "NVIDIA GPUs: none (nvidia-smi lists none)" in quiet.stdout


def test_doctor_shows_a_cuda_build_and_warns_when_no_gpu_is_found(tmp_path, cuda_tools):
    env = {"PATH": path_with(fake_nvidia_smi(tmp_path / "none", None)), "MOEQ_LLAMA_CPP_BIN": str(cuda_tools)}
    report = json.loads(run_moeq("doctor", "--json", env=env).stdout)
    assert report["ok"] is True and {t["backend"] for t in report["tools"]} == {"cuda"}
    assert report["warnings"] == ["the llama.cpp tools are a CUDA build but nvidia-smi lists no NVIDIA GPU: the "
                                  "bench's offload modes will find no device; check the driver (nvidia-smi)"]
    env["PATH"] = path_with(fake_nvidia_smi(tmp_path / "smi", [H200]))
    assert json.loads(run_moeq("doctor", "--json", env=env).stdout)["warnings"] == []


# ---------------------------------------------------------------- bench


def _example(folder: Path, extra: str = "") -> Path:
    """The example without its RPC stand-in: offload modes need a GPU."""
    text = quick_imatrix((REPO / "examples" / "tiny-phimoe.yaml").read_text())
    config = folder / "tiny-phimoe.yaml"
    config.write_text("\n".join(line for line in text.splitlines() if "rpc: local" not in line) + "\n" + extra)
    return config


@pytest.mark.slow
def test_bench_refuses_offload_modes_from_a_cpu_build_where_a_gpu_is_present(tmp_path, toolchain):
    config = _example(tmp_path)
    env = {"PATH": path_with(fake_nvidia_smi(tmp_path / "smi", [H200]))}
    assert run_moeq("quantize", "--config", str(config), "--quant", "Q2_K", env=env).returncode == 0
    proc = run_moeq("bench", "--config", str(config), "--quant", "Q2_K", env=env)
    assert proc.returncode != 0 and "Traceback" not in proc.stderr
    tool = toolchain.path("llama-bench")
    assert proc.stderr.strip().splitlines()[-1] == (
        f"error: llama-bench ({tool}): a CPU-only llama.cpp build, but this machine has an "
        "NVIDIA GPU (NVIDIA H200), so modes gpu, cpu-moe, ncmoe 1 would run on the CPU; build the CUDA tools "
        "(scripts/setup --backend cuda) and set toolchain.backend: cuda, or bench --modes cpu")
    ws = load_pipeline(config).workspace
    assert not (ws / "records" / "bench-Q2_K.json").exists()
    # The cpu mode alone is honest on any build; so is an RPC device given on purpose.
    proc = run_moeq("bench", "--config", str(config), "--quant", "Q2_K", "--modes", "cpu", "--json", env=env)
    assert proc.returncode == 0, proc.stderr
    record = json.loads(proc.stdout)[0]["record"]
    assert record["machine"]["gpus"][0]["name"] == "NVIDIA H200" and record["tool"]["backend"] == "cpu"


def test_a_cuda_pipeline_without_a_device_is_an_error_not_a_gap(tmp_path, cuda_tools):
    """toolchain.backend cuda insists on measuring: no device found fails the bench instead of 'not measured'."""
    config = _example(tmp_path, f"toolchain:\n  backend: cuda\n  llama_cpp_bin: {cuda_tools}\n")
    env = {"PATH": path_with(fake_nvidia_smi(tmp_path / "smi", [H200]))}
    assert run_moeq("quantize", "--config", str(config), "--quant", "Q2_K", env=env).returncode == 0
    proc = run_moeq("bench", "--config", str(config), "--quant", "Q2_K", "--modes", "cpu-moe", env=env)
    assert proc.returncode != 0
    ws = load_pipeline(config).workspace
    assert proc.stderr.strip().splitlines()[-1] == (
        "error: llama-bench --list-devices: finds no device, and toolchain.backend is cuda; "
        f"check the GPU and its driver (nvidia-smi); see {ws / 'bench' / 'Q2_K' / 'devices.log'}")


# ---------------------------------------------------------------- what a CUDA run prints, and the card

# llama.cpp's own format strings (src/llama-model.cpp, llama-kv-cache.cpp, llama-context.cpp, common/fit.cpp),
# as a CUDA build prints them for the tiny Q4_K_M with --cpu-moe.
CUDA_LOG = """\
load_tensors: offloading 2 repeating layers to GPU
load_tensors:        CUDA0 model buffer size =     0.69 MiB
load_tensors:   CPU_Mapped model buffer size =     1.54 MiB
llama_kv_cache:      CUDA0 KV buffer size =     0.50 MiB
sched_reserve:      CUDA0 compute buffer size =    66.50 MiB
sched_reserve:  CUDA_Host compute buffer size =     1.51 MiB
common_memory_breakdown_print: | memory breakdown [MiB] | total    free    self   model   context   compute    unaccounted |
common_memory_breakdown_print: |   - CUDA0 (H200)       | 143166 = 142395 + (  67 =     0 +       0 +      66) +         703 |
common_memory_breakdown_print: |   - Host               |                     3 =     1 +       0 +       1                |
"""


def test_cuda_buffers_and_the_breakdown_are_read(benched_record):
    buffers = parse_buffer_sizes(CUDA_LOG)
    assert [(b.device, b.kind, b.mib) for b in buffers if b.device == "CUDA0"] == [
        ("CUDA0", "model", 0.69), ("CUDA0", "KV", 0.5), ("CUDA0", "compute", 66.5)]
    [line] = parse_memory_breakdown(CUDA_LOG)
    assert (line.device, line.description) == ("CUDA0", "H200")
    assert line.mib == {"total": 143166, "free": 142395, "self": 67, "model": 0, "context": 0, "compute": 66,
                        "unaccounted": 703}


@pytest.fixture(scope="module")
def benched_record(tmp_path_factory, toolchain, rpc_device) -> BenchRecord:
    """A real bench record of the tiny Q2_K through the RPC device (cpu-moe only)."""
    folder = tmp_path_factory.mktemp("bench-cuda-card")
    config = folder / "tiny-phimoe.yaml"
    config.write_text((REPO / "examples" / "tiny-phimoe.yaml").read_text())
    assert run_moeq("quantize", "--config", str(config), "--quant", "Q2_K").returncode == 0
    proc = run_moeq("bench", "--config", str(config), "--quant", "Q2_K", "--modes", "cpu-moe", "--rpc", rpc_device,
                    "--json")
    assert proc.returncode == 0, proc.stderr
    return BenchRecord.model_validate(json.loads(proc.stdout)[0]["record"])


def test_the_card_names_the_gpu_it_was_measured_on(benched_record):
    rpc = offload_device(benched_record)
    assert rpc == "RPC0 (a ggml-rpc-server on the same machine, llama.cpp's RPC backend standing in for a GPU)"
    # The same record as a CUDA run reports it: the GPU as nvidia-smi names it, and its memory.
    [memory] = benched_record.memory
    cuda_run = memory.model_copy(update={
        "devices": {"CUDA0": {"model": 0.69}},
        "breakdown": [DeviceMemory(**vars(parse_memory_breakdown(CUDA_LOG)[0]))]})
    machine = benched_record.machine.model_copy(update={"gpus": [Gpu(name="NVIDIA H200", memory_bytes=150754820096)]})
    cuda = benched_record.model_copy(update={"memory": [cuda_run], "machine": machine})
    assert offload_device(cuda) == "CUDA0 (NVIDIA H200, 143,166 MiB)"


def test_a_cuda_build_without_cuda_tools_stops_before_any_stage(tmp_path, toolchain):
    """Every tool the planned stages call is found before the first stage: nothing is fetched or made."""
    cpu_bin = toolchain.path("llama-quantize").parent
    config = _example(tmp_path, f"toolchain:\n  backend: cuda\n  llama_cpp_bin: {cpu_bin}\n")
    proc = run_moeq("build", "--config", str(config), "--quant", "Q2_K")
    assert proc.returncode == 4, proc.stdout + proc.stderr
    assert proc.stderr.strip().splitlines()[-1:] == [
        f"error: llama-imatrix: {cpu_bin / 'llama-imatrix'} is a CPU build of llama.cpp, and toolchain.backend asks "
        "for CUDA; build it with scripts/setup --backend cuda (or point toolchain.llama_cpp_bin at a CUDA build)"]
    ws = load_pipeline(config).workspace
    assert not (ws / "source").exists() or not any((ws / "source").iterdir())
    assert not (ws / "records").exists() or not any((ws / "records").iterdir())
