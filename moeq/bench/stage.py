"""The bench stage: speed per offload mode, measured buffers beside the plan, and quality against F16.

It receives the quantize record (the file and its source) and the validate record, whose memory plan it
uses when that plan is of this file and covers bench.ctx (else the plan is computed from the header),
and writes a BenchRecord that holds every figure with the machine, tool build and command line it came
from. Its key is the file's sha256, the options, the tool's commit and the machine. The `cpu` mode
(everything in system RAM) runs everywhere; without a GPU or RPC device the offload modes are recorded
as not measured. A mode that fails (out of memory, over its time limit) is recorded as an error naming
the mode; the other modes still run. Quality is llama-perplexity's KL divergence against the F16 logits
(moeq/kld.py); for a file the choice stage chose, its figures are the choice's, measured once.

    result = run_stage(bench_stage(pipeline, quant, ws, Toolchain(), quantized, validated), records)
    result.record.speed[0].tests[0].avg_ts
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable

from moeq import texts
from moeq.machine import machine_facts
from moeq.bench.rpc import rpc_endpoint
from moeq.bench.runs import run_memory
from moeq.config import Pipeline, QuantSpec
from moeq.errors import MoeqError, ToolError
from moeq.kld import base_logits, eval_options, measure
from moeq.memory_plan import plan_file
from moeq.offload import OffloadMode, require_settings
from moeq.speed import offload_devices, run_speed
from moeq.records import (BenchOptions, BenchRecord, ChoiceRecord, Machine, MemoryPlan, MemoryRun, ModeError,
                          NotMeasured, Quality, QuantizeRecord, SpeedRun, ToolBuildRef, ValidateRecord)
from moeq.stage_runner import Stage
from moeq.toolchain import GPU_BACKENDS, Tool, Toolchain
from moeq.units import MIB
from moeq.workspace import Workspace

OFFLOAD_BACKENDS_ABSENT = {None, "", "CPU", "BLAS", "CPU,BLAS"}
NO_DEVICE = "no GPU or RPC device"  # the card says it as it is; the CLI adds what to do about it


def bench_stage(pipeline: Pipeline, quant: QuantSpec, ws: Workspace, chain: Toolchain, quantized: QuantizeRecord,
                validated: ValidateRecord | None, *, modes: tuple[str, ...] | None = None, rpc: str | None = None,
                choice: ChoiceRecord | None = None,
                on_message: Callable[[str], None] = lambda _msg: None) -> Stage[BenchRecord]:
    """Measure `quant`; `rpc` (default bench.rpc) is HOST:PORT of a ggml-rpc-server, or "local" to start one.
    `choice`: the choice stage's record, whose figures of this very file (same text, options and tool) are the
    quality figures, measured once."""
    if modes:
        require_settings(modes, "--modes")
    rpc = rpc or pipeline.bench.rpc
    cfg = pipeline.bench
    text = texts.evaluation(pipeline)
    tool = chain.tool("llama-bench")
    machine = Machine(**machine_facts())
    options = BenchOptions(
        modes=list(modes or cfg.modes), n_prompt=cfg.n_prompt, n_gen=cfg.n_gen, repetitions=cfg.repetitions,
        threads=cfg.threads, ctx=list(cfg.ctx), timeout_s=cfg.timeout_s, rpc=bool(rpc), quality=cfg.quality,
        perplexity=eval_options(pipeline, ws))
    measured = _measured_by(choice, quantized, options, tool, ws) if options.quality else None

    def key() -> dict:
        return {"file_sha256": quantized.output.sha256, "options": options.model_dump(mode="json"),
                "quality_from_choice": measured.published.quality.model_dump(mode="json") if measured else None,
                "tool_backend": tool.build.backend,
                "machine": machine.model_dump(mode="json", include={"cpu", "cores", "ram_bytes", "gpus"})}

    def run() -> BenchRecord:
        logs = ws.bench_dir(quant.type)
        model = Path(quantized.output.path)
        plan = memory_plan(quantized, validated, options.ctx)
        errors: list[ModeError] = []
        not_measured: list[NotMeasured] = []
        if not rpc:
            require_gpu_build(tool, [g.name for g in machine.gpus], options.modes)
        with rpc_endpoint(rpc, chain) as address:  # "local": a ggml-rpc-server for this run only
            speed, memory = _modes(chain, model, plan, options, address, logs, errors, not_measured, on_message)
        quality = None
        if measured is not None:
            quality = Quality(base=measured.base, quant=measured.published.quality, text=measured.options.text,
                              ctx=measured.options.ctx, chunks=measured.options.chunks)
        elif options.quality:
            quality = _quality(chain, quantized, ws, text, options, errors, on_message)
        return BenchRecord(quant=quant.type, file=quantized.output, machine=machine,
                           tool=ToolBuildRef(**tool.build.as_dict()), options=options, speed=speed, memory=memory,
                           quality=quality, errors=errors, not_measured=not_measured)

    return Stage("bench", quant.type, key=key, run=run, tool=lambda: tool)


def _measured_by(choice: ChoiceRecord | None, quantized: QuantizeRecord, options: BenchOptions, tool: Tool,
                 ws: Workspace) -> ChoiceRecord | None:
    """The choice record when it measured this very file as the bench would (text, options, llama.cpp build), and
    the file is still those bytes (the hash cache knows them unless it changed)."""
    if (choice is None or choice.published.file.sha256 != quantized.output.sha256
            or choice.options != options.perplexity or choice.tool.commit != tool.build.commit):
        return None
    path = Path(quantized.output.path)
    if not path.is_file() or ws.hashes.sha256(path) != quantized.output.sha256:
        return None
    return choice


def require_gpu_build(tool: Tool, gpus: list[str], modes: list[str]) -> None:
    """Offload modes from a CPU-only build on a machine with an NVIDIA GPU would measure the CPU and call
    it GPU offload: refuse them, saying how to get the CUDA tools."""
    offload = [f"ncmoe {m}" if str(m).isdigit() else str(m) for m in modes if m != "cpu"]
    if offload and gpus and tool.build.backend not in GPU_BACKENDS:
        modes_text = ("modes " if len(offload) > 1 else "mode ") + ", ".join(offload)
        raise ToolError(f"{tool.name} ({tool.path})", "a CPU-only llama.cpp build, but this machine has an NVIDIA GPU "
                        f"({', '.join(sorted(set(gpus)))}), so {modes_text} would run on the CPU",
                        "build the CUDA tools (scripts/setup --backend cuda) and set toolchain.backend: cuda, or "
                        "bench --modes cpu")


def memory_plan(quantized: QuantizeRecord, validated: ValidateRecord | None, ctx: list[int]) -> MemoryPlan:
    """The validate record's plan when it is of this file and covers `ctx`; else computed from the header (about a second)."""
    if validated is not None and validated.file.sha256 == quantized.output.sha256 and validated.plan.covers(ctx):
        return validated.plan
    return plan_file(Path(quantized.output.path), ctx_sizes=ctx)


def _modes(chain: Toolchain, model: Path, plan: MemoryPlan, options: BenchOptions, rpc: str | None, logs: Path,
           errors: list[ModeError], not_measured: list[NotMeasured],
           on_message: Callable[[str], None]) -> tuple[list[SpeedRun], list[MemoryRun]]:
    """Speed per mode, and buffers per offload mode beside the plan.

    Without an offload device (no GPU found, no RPC device given) the offload modes are not measured,
    which is not a failure; a mode that was tried and failed is an error.
    """
    speed, memory = [], []
    modes = [OffloadMode.from_setting(setting, plan.n_layer) for setting in options.modes]
    no_device = None
    if rpc is None and any(m.offload for m in modes):
        if not offload_devices(chain.path("llama-bench"), logs / "devices.log", options.timeout_s):
            if chain.backend in GPU_BACKENDS:  # the pipeline insists on measuring on that GPU
                raise ToolError("llama-bench --list-devices", f"finds no device, and toolchain.backend is {chain.backend}",
                                f"check the GPU and its driver (nvidia-smi); see {logs / 'devices.log'}")
            no_device = NO_DEVICE
    for mode in modes:
        if mode.offload and no_device:
            not_measured.append(NotMeasured(mode=mode.name, reason=no_device))
            continue
        slug = mode.name.replace(" ", "-")
        try:
            on_message(f"{model.name}: llama-bench, mode {mode.name}")
            result = SpeedRun(**run_speed(chain.path("llama-bench"), model, mode, logs / f"speed-{slug}.log",
                                          n_prompt=options.n_prompt, n_gen=options.n_gen,
                                          repetitions=options.repetitions, threads=options.threads,
                                          rpc=rpc if mode.offload else None, timeout_s=options.timeout_s))
            if mode.offload and result.backends in OFFLOAD_BACKENDS_ABSENT:
                raise ToolError(f"bench mode {mode.name}", f"llama.cpp ran on {result.backends or 'the CPU'} only, though "
                                f"an offload device was {'given (' + rpc + ')' if rpc else 'found'}",
                                "check the device and the llama.cpp build")
            speed.append(result)
            if not mode.offload:  # nothing is placed on a device: there is no plan to compare buffers with
                continue
            for ctx in options.ctx:
                on_message(f"{model.name}: llama-completion, mode {mode.name}, context {ctx}")
                measured = run_memory(chain.path("llama-completion"), model, mode, ctx,
                                      logs / f"memory-{slug}-{ctx}.log", threads=options.threads, rpc=rpc,
                                      timeout_s=options.timeout_s)
                memory.append(_compare(measured, plan.placement(mode.n_cpu_moe).gpu_bytes, plan.kv_bytes.get(ctx)))
        except MoeqError as exc:
            errors.append(ModeError(mode=mode.name, error=exc.message))
    return speed, memory


def _compare(measured: dict, planned_model: int, planned_kv: int | None) -> MemoryRun:
    """Measured buffers on the offload devices (not CPU*) beside the plan, in MiB."""
    device = {"model": 0.0, "KV": 0.0, "compute": 0.0}
    for name, kinds in measured["devices"].items():
        if not name.startswith("CPU"):
            for kind in device:
                device[kind] += kinds.get(kind, 0.0)
    planned = {"model": round(planned_model / MIB, 2), "KV": round(planned_kv / MIB, 2) if planned_kv else None}
    return MemoryRun(**measured, device_mib={k: round(v, 2) for k, v in device.items()}, planned_mib=planned,
                     difference_mib={k: round(device[k] - planned[k], 2) for k in ("model", "KV")
                                     if planned[k] is not None})


def _quality(chain: Toolchain, quantized: QuantizeRecord, ws: Workspace, text: Path, options: BenchOptions,
             errors: list[ModeError], on_message: Callable[[str], None]) -> Quality | None:
    ppl = options.perplexity
    try:
        commit = chain.tool("llama-perplexity").build.commit
        base_kld, base = base_logits(ws, chain, quantized.source, ppl, text, commit,
                                     threads=options.threads, timeout_s=options.timeout_s, on_message=on_message)
        on_message(f"{Path(quantized.output.path).name}: llama-perplexity with KL divergence against F16")
        figures = measure(chain, Path(quantized.output.path), text, base_kld, ppl,
                          ws.bench_dir(quantized.quant) / "perplexity.log", threads=options.threads,
                          timeout_s=options.timeout_s)
    except MoeqError as exc:
        errors.append(ModeError(mode="quality", error=exc.message))
        return None
    return Quality(base=base, quant=figures, text=ppl.text, ctx=ppl.ctx, chunks=ppl.chunks)
