"""The memory plan against llama.cpp itself, with the RPC backend standing in for a GPU."""

from __future__ import annotations

import json
import subprocess

import pytest

from moeq.config import SynthSpec
from moeq.llama_logs import buffer_total, parse_buffer_sizes
from moeq.synth import write_synth_model
from moeq.memory_plan import plan_file

from conftest import run_moeq

MIB = 2**20
CTX = 1024


@pytest.fixture(scope="module")
def model(tmp_path_factory, toolchain):
    """A 3-layer, 8-expert phimoe in Q4_K_M: buffers of several MiB."""
    tmp = tmp_path_factory.mktemp("plan")
    f16 = write_synth_model(tmp / "f16.gguf", SynthSpec(layers=3, experts=8))
    out = tmp / "q4km.gguf"
    subprocess.run([str(toolchain.path("llama-quantize")), str(f16), str(out), "Q4_K_M"],
                   check=True, capture_output=True)
    return out


def load_on_device(toolchain, model, rpc, extra: list[str]) -> list:
    command = [str(toolchain.path("llama-completion")), "-m", str(model), "--rpc", rpc, "-ngl", "99",
               "-fit", "off", "-c", str(CTX), "-n", "1", "-p", "hi", "-no-cnv", "-v", "-t", "2", *extra]
    proc = subprocess.run(command, capture_output=True, text=True, errors="replace", timeout=120,
                          stdin=subprocess.DEVNULL)
    assert proc.returncode == 0, proc.stderr[-2000:]
    return parse_buffer_sizes(proc.stderr)


@pytest.mark.parametrize("extra,n_cpu_moe", [([], 0), (["--cpu-moe"], 3), (["-ncmoe", "1"], 1)],
                         ids=["all-offloaded", "cpu-moe", "ncmoe-1"])
def test_plan_matches_llama_cpp_buffers(model, rpc_device, toolchain, extra, n_cpu_moe):
    plan = plan_file(model, ctx_sizes=[CTX])
    expected = plan.placement(n_cpu_moe)
    lines = load_on_device(toolchain, model, rpc_device, extra)
    device = buffer_total(lines, "model", "RPC0")
    assert plan.placement(0).gpu_bytes > 4 * MIB, "the model should be large enough to compare"
    assert abs(device - expected.gpu_bytes / MIB) <= 0.1, (device, expected)
    # The host side is not compared: CPU_Mapped reports the span of the file mapping, and CPU_REPACK
    # holds re-laid-out copies of some of the same tensors, so their sum is not the bytes placed there.
    assert abs(buffer_total(lines, "KV", "RPC0") - plan.kv_bytes[CTX] / MIB) <= 0.1


def test_cpu_moe_moves_exactly_the_expert_bytes(model):
    plan = plan_file(model, ctx_sizes=[CTX])
    all_gpu, cpu_moe = plan.placement(0), plan.placement(plan.n_layer)
    assert all_gpu.gpu_bytes + all_gpu.cpu_bytes == cpu_moe.gpu_bytes + cpu_moe.cpu_bytes
    steps = [plan.placement(n).gpu_bytes for n in range(plan.n_layer + 1)]
    assert steps == sorted(steps, reverse=True) and len(set(steps)) == len(steps)


def test_fit_table_and_cli(model):
    proc = run_moeq("plan", str(model), "--ctx", "4096", "--json", "--compute-allowance-mib", "0")
    assert proc.returncode == 0, proc.stderr
    data = json.loads(proc.stdout)
    assert [f["gpu_gib"] for f in data["fits"]] == [8, 12, 16, 24, 48, 80]
    assert all(f["advice"] == "all on the GPU" for f in data["fits"])
    # A 3-layer model with 3 MiB of KV at 1024 tokens: 3 x 1024 x 2 x 128 x 2 bytes.
    assert plan_file(model, ctx_sizes=[1024]).kv_bytes[1024] == 3 * 1024 * 2 * 128 * 2


def test_plan_of_a_non_gguf_file(tmp_path):
    junk = tmp_path / "junk.gguf"
    junk.write_bytes(b"not a model at all")
    proc = run_moeq("plan", str(junk))
    assert proc.returncode == 3
    assert proc.stderr == f"error: {junk}: not a GGUF file (starts with b'not '); give a .gguf file\n"
