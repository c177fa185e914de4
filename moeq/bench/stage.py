"""The bench stage: speed per offload mode, measured buffers beside the plan, and quality against F16.

Reads the quantize record (the file and its source) and the validate record's memory plan (computed
from the file's header when validate has not run) and writes a BenchRecord that holds every figure
with the machine, tool build and command line it came from. The `cpu` mode (everything in system RAM)
runs everywhere; without a GPU or RPC device the offload modes are recorded as not measured. A mode
that fails (out of memory, over its time limit) is recorded as an error naming the mode; the other
modes still run.

    >>> outcome = bench_quant(pipeline, pipeline.quant("Q8_0"), ws, Toolchain(), rpc="127.0.0.1:50052")
    >>> outcome.record.speed[0]["tests"][0]["avg_ts"]
"""

from __future__ import annotations

import hashlib
import json
import time
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Callable

from moeq.bench.machine import machine_facts
from moeq.bench.rpc import rpc_endpoint
from moeq.bench.runs import offload_devices, run_memory, run_perplexity, run_speed
from moeq.config import Pipeline, QuantSpec
from moeq.offload import OffloadMode
from moeq.errors import MoeqError, ToolError
from moeq.quantize.stage import quantize_record
from moeq.records import BenchRecord, QuantizeRecord, ToolBuildRef, ValidateRecord
from moeq.toolchain import Toolchain
from moeq.validate.plan import plan_file
from moeq.workspace import Workspace, commit_file, partial_path, write_text_atomic

MIB = 2**20
OFFLOAD_BACKENDS_ABSENT = {None, "", "CPU", "BLAS", "CPU,BLAS"}
NO_DEVICE = "no GPU or RPC device"  # the card says it as it is; the CLI adds what to do about it


@dataclass
class BenchOutcome:
    record: BenchRecord
    skipped: bool
    errors: list[dict] = field(default_factory=list)


def default_eval_text() -> Path:
    return Path(str(resources.files("moeq.bench") / "eval-text.txt"))


def bench_quant(pipeline: Pipeline, quant: QuantSpec, ws: Workspace, chain: Toolchain, *,
                modes: tuple[str, ...] | None = None, rpc: str | None = None, force: bool = False,
                on_message: Callable[[str], None] = lambda _msg: None) -> BenchOutcome:
    """Measure `quant`; `rpc` (default bench.rpc) is HOST:PORT of a ggml-rpc-server, or "local" to start one."""
    rpc = rpc or pipeline.bench.rpc
    quantized = quantize_record(pipeline, quant, ws)
    cfg = pipeline.bench
    text = cfg.perplexity.text or default_eval_text()
    options = {
        "modes": list(modes or cfg.modes), "n_prompt": cfg.n_prompt, "n_gen": cfg.n_gen,
        "repetitions": cfg.repetitions, "threads": cfg.threads, "ctx": list(cfg.ctx), "timeout_s": cfg.timeout_s,
        "rpc": bool(rpc), "perplexity": {"text": text.name, "text_sha256": ws.hashes.sha256(text),
                                         "ctx": cfg.perplexity.ctx, "chunks": cfg.perplexity.chunks},
    }
    machine = machine_facts()
    record_path = ws.record_path("bench", quant.type)
    tool = chain.tool("llama-bench")
    with ws.lock(f"bench-{quant.type}", on_wait=on_message):
        previous = BenchRecord.load(record_path)
        if (not force and previous and previous.file.sha256 == quantized.output.sha256 and previous.options == options
                and previous.tool.commit == tool.build.commit and _same_machine(previous.machine, machine)):
            return BenchOutcome(previous, skipped=True, errors=previous.errors)
        started = time.monotonic()
        logs = ws.bench_dir(quant.type)
        model = Path(quantized.output.path)
        plan = _memory_plan(pipeline, quant, ws, quantized)
        errors: list[dict] = []
        not_measured: list[dict] = []
        with rpc_endpoint(rpc, chain) as address:  # "local": a ggml-rpc-server for this run only
            speed, memory = _modes(chain, model, plan, options, address, logs, errors, not_measured, on_message)
        quality = _quality(chain, pipeline, quantized, ws, text, options, errors, on_message)
        record = BenchRecord(
            quant=quant.type, file=quantized.output, machine=machine, tool=ToolBuildRef(**tool.build.as_dict()),
            options=options, speed=speed, memory=memory, quality=quality, errors=errors,
            wall_s=round(time.monotonic() - started, 3), not_measured=not_measured,
        )
        record.save(record_path)
    return BenchOutcome(record, skipped=False, errors=errors)


def _same_machine(a: dict, b: dict) -> bool:
    keys = ("cpu", "cores", "ram_bytes", "gpus")
    return all(a.get(k) == b.get(k) for k in keys)


def _memory_plan(pipeline: Pipeline, quant: QuantSpec, ws: Workspace, quantized: QuantizeRecord) -> dict:
    """The validate record's plan when it is of this file; else computed from the header (about a second)."""
    validated = ValidateRecord.load(ws.record_path("validate", quant.type))
    if validated is not None and validated.file.sha256 == quantized.output.sha256:
        return validated.plan
    return plan_file(Path(quantized.output.path), ctx_sizes=list(pipeline.bench.ctx)).as_dict()


def _modes(chain: Toolchain, model: Path, plan: dict, options: dict, rpc: str | None, logs: Path,
           errors: list[dict], not_measured: list[dict],
           on_message: Callable[[str], None]) -> tuple[list[dict], list[dict]]:
    """Speed per mode, and buffers per offload mode beside the plan.

    Without an offload device (no GPU found, no RPC device given) the offload modes are not measured,
    which is not a failure; a mode that was tried and failed is an error.
    """
    speed, memory = [], []
    placements = {p["n_cpu_moe"]: p for p in plan["weights"]}
    kv_planned = {int(c): n for c, n in plan["kv_bytes"].items()}
    modes = [OffloadMode.from_setting(setting, plan["n_layer"]) for setting in options["modes"]]
    no_device = None
    if rpc is None and any(m.offload for m in modes):
        if not offload_devices(chain.path("llama-bench"), logs / "devices.log", options["timeout_s"]):
            no_device = NO_DEVICE
    for mode in modes:
        if mode.offload and no_device:
            not_measured.append({"mode": mode.name, "reason": no_device})
            continue
        slug = mode.name.replace(" ", "-")
        try:
            on_message(f"{model.name}: llama-bench, mode {mode.name}")
            result = run_speed(chain.path("llama-bench"), model, mode, logs / f"speed-{slug}.log",
                               n_prompt=options["n_prompt"], n_gen=options["n_gen"],
                               repetitions=options["repetitions"], threads=options["threads"],
                               rpc=rpc if mode.offload else None, timeout_s=options["timeout_s"])
            if mode.offload and result["backends"] in OFFLOAD_BACKENDS_ABSENT:
                raise ToolError(f"llama.cpp ran on {result['backends'] or 'the CPU'} only in mode {mode.name}, "
                                f"though an offload device was {'given (' + rpc + ')' if rpc else 'found'}; "
                                "check the device and the llama.cpp build")
            speed.append(result)
            if not mode.offload:  # nothing is placed on a device: there is no plan to compare buffers with
                continue
            for ctx in options["ctx"]:
                on_message(f"{model.name}: llama-completion, mode {mode.name}, context {ctx}")
                measured = run_memory(chain.path("llama-completion"), model, mode, ctx,
                                      logs / f"memory-{slug}-{ctx}.log", threads=options["threads"], rpc=rpc,
                                      timeout_s=options["timeout_s"])
                memory.append(_compare(measured, placements[mode.n_cpu_moe]["gpu_bytes"], kv_planned.get(ctx)))
        except MoeqError as exc:
            errors.append({"mode": mode.name, "error": exc.message})
    return speed, memory


def _compare(measured: dict, planned_model: int, planned_kv: int | None) -> dict:
    """Measured buffers on the offload devices (not CPU*) beside the plan, in MiB."""
    device = {"model": 0.0, "KV": 0.0, "compute": 0.0}
    for name, kinds in measured["devices"].items():
        if not name.startswith("CPU"):
            for kind in device:
                device[kind] += kinds.get(kind, 0.0)
    planned = {"model": round(planned_model / MIB, 2), "KV": round(planned_kv / MIB, 2) if planned_kv else None}
    return {**measured, "device_mib": {k: round(v, 2) for k, v in device.items()}, "planned_mib": planned,
            "difference_mib": {k: round(device[k] - planned[k], 2) for k in ("model", "KV") if planned[k] is not None}}


def _quality(chain: Toolchain, pipeline: Pipeline, quantized: QuantizeRecord, ws: Workspace, text: Path,
             options: dict, errors: list[dict], on_message: Callable[[str], None]) -> dict | None:
    ppl = options["perplexity"]
    key = hashlib.sha256(json.dumps([quantized.source.sha256, ppl, quantized.tool.commit]).encode()).hexdigest()[:16]
    folder = ws.bench_dir("base")
    base_kld, base_json = folder / f"{key}.kld", folder / f"{key}.json"
    tool = chain.path("llama-perplexity")
    try:
        with ws.lock(f"kld-base-{key}", on_wait=on_message):
            if not (base_kld.is_file() and base_json.is_file()):
                on_message(f"{Path(quantized.source.path).name}: llama-perplexity on the F16 source (saved for KLD)")
                partial = partial_path(base_kld)  # one left by a killed run is started over (we hold the lock)
                try:
                    base = run_perplexity(tool, Path(quantized.source.path), text, folder / f"{key}.log",
                                          ctx=ppl["ctx"], chunks=ppl["chunks"], kld_base=partial, save_base=True,
                                          threads=options["threads"], timeout_s=options["timeout_s"])
                    commit_file(partial, base_kld)
                finally:
                    partial.unlink(missing_ok=True)
                write_text_atomic(base_json, json.dumps(base, indent=1))
            base = json.loads(base_json.read_text())
        on_message(f"{Path(quantized.output.path).name}: llama-perplexity with KL divergence against F16")
        quant = run_perplexity(tool, Path(quantized.output.path), text, ws.bench_dir(quantized.quant) /
                               "perplexity.log", ctx=ppl["ctx"], chunks=ppl["chunks"], kld_base=base_kld,
                               save_base=False, threads=options["threads"], timeout_s=options["timeout_s"])
    except MoeqError as exc:
        errors.append({"mode": "quality", "error": exc.message})
        return None
    return {"base": base, "quant": quant, "text": ppl["text"], "ctx": ppl["ctx"], "chunks": ppl["chunks"]}
