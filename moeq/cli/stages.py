"""Commands for the tools and the first stages: doctor, synth, check-config, quantize, plan, validate."""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.table import Table

from moeq.cli.common import (ConfigOption, JsonOption, QuantsOption, app, console, guard, open_context,
                             pipeline_from, print_json, selected_quants, synth_app)
from moeq.config import SynthSpec
from moeq.errors import CheckFailed, InputError, ToolError
from moeq.records import record_json
from moeq.toolchain import Toolchain
from moeq.units import binary_size, decimal_size


# ---------------------------------------------------------------- doctor


@app.command()
@guard
def doctor(
    config: Annotated[Optional[Path], typer.Option("--config", "-c", help="Also validate this pipeline file "
                                                   "and check disk space for it (default: $MOEQ_CONFIG; without "
                                                   "either, only the machine is checked).")] = None,
    as_json: JsonOption = False,
) -> None:
    """Check the llama.cpp tools, Python packages, Hub login and (with --config) disk space."""
    from moeq.doctor import run_doctor

    # Not ./pipeline.yaml by default: in a checkout that is the full release, and doctor checks the machine.
    pipeline = pipeline_from(config) if config is not None or os.environ.get("MOEQ_CONFIG") else None
    chain = pipeline.toolchain.chain(fresh=True) if pipeline else Toolchain(fresh=True)
    report = run_doctor(chain, pipeline)
    if as_json:
        print_json(report.as_dict())
    else:
        table = Table(title="llama.cpp tools")
        for column in ("tool", "status", "commit", "backend", "path"):
            table.add_column(column, overflow="fold")
        for check in report.tools:
            status = f"[green]{check.detail}[/]" if check.ok else "[red]problem (below)[/]"
            table.add_row(check.name, status, check.commit, check.backend, check.path)
        console.print(table)
        for check in report.tools:
            if not check.ok:
                sys.stdout.write(f"problem: {check.detail}\n")
        gpus = ", ".join(f"{g['name']}" + (f" ({binary_size(g['memory_bytes'])})" if g["memory_bytes"] else "")
                         for g in report.gpus)
        console.print(f"NVIDIA GPUs: {gpus or 'none (nvidia-smi lists none)'}")
        for warning in report.warnings:
            sys.stdout.write(f"warning: {warning}\n")
        packages = Table(title="Python packages")
        packages.add_column("package")
        packages.add_column("version")
        for name, version in report.packages.items():
            packages.add_row(name, version)
        console.print(packages)
        console.print(f"Hub endpoint: {report.hub_endpoint}")
        console.print(f"Hub token present: {'yes' if report.hub_token_present else 'no'}")
        if report.disk:
            disk = report.disk
            if disk.needed_bytes is None:
                console.print(f"Disk: {decimal_size(disk.free_bytes)} free in {disk.workspace}; need unknown "
                              "(set model.parameters in the pipeline file)")
            else:
                verdict = "[green]OK[/]" if disk.ok else "[red]NOT ENOUGH[/]"
                console.print(f"Disk: {decimal_size(disk.free_bytes)} free in {disk.workspace}, "
                              f"pipeline needs {decimal_size(disk.needed_bytes)} (its peak, about "
                              f"{decimal_size(disk.peak_bytes)}, with 10% and 64 MiB of room): {verdict}")
                if disk.refetch_bytes:
                    console.print(f"  a later moeq fetch --force downloads beside it all: about "
                                  f"{decimal_size(disk.refetch_bytes)}")
    if not report.ok:
        problems = [c.name for c in report.tools if not c.ok]
        if report.disk and not report.disk.ok:
            problems.append("disk space")
        raise CheckFailed(f"doctor found problems with: {', '.join(problems)}")


# ---------------------------------------------------------------- synth


@synth_app.command("tiny-moe")
@guard
def synth_tiny_moe(
    out: Annotated[Path, typer.Argument(help="Output GGUF path.")],
    arch: Annotated[str, typer.Option(help="Architecture: phimoe, qwen3moe, llama-moe (Mixtral's) or qwen2moe "
                                      "(shared experts).")] = "phimoe",
    preset: Annotated[Optional[str], typer.Option(help="Start from a real model's dimensions: phi-3.5-moe (32 "
                                                  "layers of 16 experts, 84 GB in F16), qwen3-30b-a3b or "
                                                  "mixtral-8x7b (they set --arch); use --layers to make fewer. "
                                                  "The other options change it.")] = None,
    layers: Annotated[Optional[int], typer.Option(help=f"Blocks [default: {SynthSpec.layers}].")] = None,
    experts: Annotated[Optional[int], typer.Option(help="Experts [default: 4; 8 for qwen3moe and "
                                                   "llama-moe].")] = None,
    experts_used: Annotated[Optional[int], typer.Option(help="Experts per token "
                                                        f"[default: {SynthSpec.experts_used}].")] = None,
    embd: Annotated[Optional[int], typer.Option(help="Embedding width, a multiple of 256 "
                                                f"[default: {SynthSpec.embd}].")] = None,
    ff: Annotated[Optional[int], typer.Option(help="Expert FFN width, a multiple of 256 "
                                              f"[default: {SynthSpec.ff}].")] = None,
    heads: Annotated[Optional[int], typer.Option(help=f"Query heads [default: {SynthSpec.heads}].")] = None,
    kv_heads: Annotated[Optional[int], typer.Option(help=f"KV heads [default: {SynthSpec.kv_heads}].")] = None,
    vocab: Annotated[Optional[int], typer.Option(help=f"Vocabulary size [default: {SynthSpec.vocab}].")] = None,
    seed: Annotated[Optional[int], typer.Option(help=f"Random seed [default: {SynthSpec.seed}].")] = None,
    as_json: JsonOption = False,
) -> None:
    """Write a deterministic F16 GGUF of a llama.cpp MoE architecture, with the tensor names, shapes and keys its
    converter writes for the real model: scaled down, or at a real model's dimensions with --preset. Written
    tensor by tensor, in bounded memory. `tiny-phimoe` is the same command with --arch phimoe."""
    from moeq.synth import parameter_count, synth_spec, write_synth_model

    arch, spec = synth_spec(preset, arch, layers=layers, experts=experts, experts_used=experts_used, embd=embd,
                            ff=ff, heads=heads, kv_heads=kv_heads, vocab=vocab, seed=seed)
    path = write_synth_model(out, spec, arch, name=preset or f"tiny-{arch}")
    result = {"path": str(path), "bytes": path.stat().st_size, "parameters": parameter_count(spec, arch),
              "arch": arch, "options": vars(spec)}
    if as_json:
        print_json(result)
    else:
        console.print(f"wrote {path} ({decimal_size(result['bytes'])}, {result['parameters']:,} parameters, {arch})")


synth_app.command("tiny-phimoe", help="The tiny-moe command for phimoe: a deterministic F16 phimoe GGUF with "
                  "Phi-3.5-MoE's layout, scaled down or at its real dimensions (--preset phi-3.5-moe).")(
    guard(synth_tiny_moe))


@synth_app.command("tiny-phimoe-hf")
@guard
def synth_tiny_phimoe_hf(
    out: Annotated[Path, typer.Argument(help="Output folder.")],
    layers: int = SynthSpec.layers,
    experts: int = SynthSpec.experts,
    vocab: Annotated[int, typer.Option(help="SentencePiece vocabulary size (300 or more).")] = 320,
    seed: int = SynthSpec.seed,
    train: Annotated[bool, typer.Option("--train", help="Train it on moeq's training text (a few minutes on "
                                        "the CPU; cached, so once per machine) instead of random weights.")] = False,
) -> None:
    """Write a tiny PhiMoE checkpoint in Hugging Face's layout (config, safetensors, tokenizer), for `kind: hf`."""
    import shutil

    from moeq.synth_hf import write_tiny_phimoe_hf
    from moeq.synth_train import trained_checkpoint

    spec = SynthSpec(layers=layers, experts=experts, vocab=vocab, seed=seed)
    if train:
        if out.exists() and any(out.iterdir()):
            raise InputError(f"{out}: not empty; give a new folder for the trained checkpoint")
        shutil.copytree(trained_checkpoint(spec, on_message=lambda m: sys.stderr.write(m + "\n")), out,
                        dirs_exist_ok=True, ignore=shutil.ignore_patterns(".complete"))
        folder = out
    else:
        folder = write_tiny_phimoe_hf(out, spec)
    console.print(f"wrote {folder}: {', '.join(sorted(p.name for p in folder.iterdir()))}")


# ---------------------------------------------------------------- config


@app.command("check-config")
@guard
def check_config(config: ConfigOption = None, as_json: JsonOption = False) -> None:
    """Validate a pipeline file and show the repos and files it will produce."""
    pipeline = pipeline_from(config)
    rows = [{"quant": q.type, "file": q.file, "repo": pipeline.repo_id(q),
             "imatrix": str(q.imatrix) if q.imatrix else "none"} for q in pipeline.quants]
    if as_json:
        print_json({"pipeline": str(pipeline.path), "workspace": str(pipeline.workspace), "quants": rows})
        return
    table = Table(title=f"{pipeline.path}: {pipeline.model.name}")
    for column in ("quant", "file", "repo", "imatrix"):
        table.add_column(column, overflow="fold")
    for row in rows:
        table.add_row(row["quant"], row["file"], row["repo"], row["imatrix"])
    console.print(table)
    console.print(f"workspace: {pipeline.workspace}")


# ---------------------------------------------------------------- quantize


@app.command()
@guard
def quantize(
    config: ConfigOption = None,
    quant: QuantsOption = None,
    force: Annotated[bool, typer.Option(help="Run even when the record says it is up to date.")] = False,
    threads: Annotated[Optional[int], typer.Option(help="Threads for llama-quantize.")] = None,
    allow_requantize: Annotated[bool, typer.Option(help="Accept an already-quantized source "
                                                   "(loses quality).")] = False,
    as_json: JsonOption = False,
) -> None:
    """Quantize the configured F16 source into each requested quant of the ladder."""
    from moeq import steps
    from moeq.quantize.stage import log_path

    ctx = open_context(config)
    results = []
    for spec in selected_quants(ctx.pipeline, quant):
        with _quantize_progress(spec.type, plain=as_json or not console.is_terminal) as on_tensor:
            done = steps.quantize(ctx, spec, force=force, threads=threads, allow_requantize=allow_requantize,
                                  on_tensor=on_tensor)
        record = done.record
        results.append({"skipped": done.skipped, "log": str(log_path(ctx.ws.quant_path(spec.file))),
                        "record": record_json(record)})
        if not as_json:
            state = "up to date" if done.skipped else f"done in {done.wall_s:.1f} s"
            console.print(f"{record.quant}: {state}: {record.output.path} "
                          f"({decimal_size(record.output.size)}, {record.quant_bpw:.2f} BPW)", soft_wrap=True)
    if as_json:
        print_json(results)


class _quantize_progress:
    """A rich progress bar on a terminal; plain log lines (stderr) otherwise."""

    def __init__(self, label: str, plain: bool):
        self.label, self.plain = label, plain
        self.progress = None
        self.task = None
        self.mib_in = self.mib_out = 0.0

    def __enter__(self):
        if not self.plain:
            from rich.progress import (BarColumn, MofNCompleteColumn, Progress, TextColumn,
                                       TimeElapsedColumn, TimeRemainingColumn)

            self.progress = Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                                     TextColumn("{task.fields[mib]}"), TimeElapsedColumn(),
                                     TimeRemainingColumn(), console=console, transient=True)
            self.progress.__enter__()
            self.task = self.progress.add_task(self.label, total=None, mib="")
        return self.on_tensor

    def on_tensor(self, t) -> None:
        self.mib_in += t.mib_in
        self.mib_out += t.mib_out
        if self.plain:
            sys.stderr.write(f"{self.label}: [{t.index}/{t.total}] {t.name} {t.type_before} -> {t.type_after} "
                             f"({self.mib_in:.1f} -> {self.mib_out:.1f} MiB)\n")
        else:
            self.progress.update(self.task, total=t.total, completed=t.index,
                                 mib=f"{self.mib_in:.1f} -> {self.mib_out:.1f} MiB")

    def __exit__(self, *exc):
        if self.progress is not None:
            self.progress.__exit__(*exc)
        return False


# ---------------------------------------------------------------- imatrix


@app.command()
@guard
def imatrix(
    config: ConfigOption = None,
    force: Annotated[bool, typer.Option(help="Run even when the record says it is up to date.")] = False,
    as_json: JsonOption = False,
) -> None:
    """Compute the importance matrix of the F16 source with the calibration text, and each expert's coverage.

    Quants with `imatrix: auto` are made with it (moeq build and moeq quantize run this first for them).
    """
    from moeq import steps

    ctx = open_context(config)
    done = steps.imatrix(ctx, force=force)
    record = done.record
    if as_json:
        print_json({"skipped": done.skipped, "record": record_json(record)})
        return
    state = "up to date" if done.skipped else f"done in {done.wall_s:.1f} s"
    coverage = record.coverage
    console.print(f"imatrix: {state}: {record.output.path} ({record.chunks} chunks of {record.ctx} tokens of "
                  f"{record.calibration.name})", soft_wrap=True)
    console.print(f"expert coverage: {coverage.experts} experts, tokens per expert min {coverage.min:,}, median "
                  f"{coverage.median:,.0f}, max {coverage.max:,}; {len(coverage.under)} under "
                  f"{coverage.min_expert_tokens}", soft_wrap=True)
    for warning in record.warnings if done.skipped else []:  # a run said them as it went
        console.print(f"[yellow]warning[/]: {warning}", soft_wrap=True)


# ---------------------------------------------------------------- plan


@app.command()
@guard
def plan(
    file: Annotated[Path, typer.Argument(help="A GGUF file.")],
    ctx: Annotated[Optional[list[int]], typer.Option("--ctx", help="Context size(s) for the KV cache.")] = None,
    kv_type: Annotated[str, typer.Option(help="KV cache type: f16 or q8_0.")] = "f16",
    compute_allowance_mib: Annotated[int, typer.Option(help="Allowance for compute buffers and context, "
                                                       "per GPU.")] = 1024,
    as_json: JsonOption = False,
) -> None:
    """Where each byte of FILE goes under llama.cpp's placement rules, and what fits which GPU."""
    from moeq.memory_plan import plan_file

    from moeq.config import MAX_CTX

    for size in ctx or []:
        if not 1 <= size <= MAX_CTX:
            raise InputError(f"--ctx {size}: a context size is 1 to {MAX_CTX} tokens")
    if compute_allowance_mib < 0:
        raise InputError(f"--compute-allowance-mib {compute_allowance_mib}: use 0 or more")
    _require_file(file)
    result = plan_file(file, ctx_sizes=ctx or [4096], kv_type=kv_type,
                       compute_allowance=compute_allowance_mib * 2**20)
    if as_json:
        print_json(record_json(result))
        return
    weights = Table(title=f"{file.name}: weights by placement (computed from the file's tensors)")
    for column in ("mode", "GPU", "system RAM"):
        weights.add_column(column)
    for p in result.weights:
        weights.add_row(p.mode, binary_size(p.gpu_bytes), binary_size(p.cpu_bytes))
    console.print(weights)
    fits = Table(title=f"smallest -ncmoe that fits (KV {result.kv_type}, "
                       f"{compute_allowance_mib} MiB compute allowance)")
    fits.add_column("GPU")
    for c in result.kv_bytes:
        fits.add_column(f"ctx {c} (KV {binary_size(result.kv_bytes[c])})")
    for gib in sorted({f.gpu_gib for f in result.fits}):
        fits.add_row(f"{gib} GiB", *[f.advice for f in result.fits if f.gpu_gib == gib])
    console.print(fits)


# ---------------------------------------------------------------- validate


def _require_file(file: Path) -> None:
    if file.is_dir():
        raise InputError(f"{file}: a folder; pass the path of a GGUF model")
    if not file.is_file():
        raise InputError(f"{file}: no such file; pass the path of a GGUF model")


@app.command()
@guard
def validate(
    file: Annotated[Optional[Path], typer.Argument(help="The GGUF file to check (or use --config/--quant).")] = None,
    config: Annotated[Optional[Path], typer.Option("--config", "-c", help="Validate the ladder's file for "
                                                   "--quant against the workspace's source (the pipeline: "
                                                   "--config, $MOEQ_CONFIG, else ./pipeline.yaml).")] = None,
    against: Annotated[Optional[Path], typer.Option(help="The F16 source it was made from.")] = None,
    numerics: Annotated[str, typer.Option(help="sample, full or off.")] = "sample",
    arch: Annotated[Optional[str], typer.Option(help="Expected architecture (default: the source's; without "
                                                "one, any mixture of experts llama.cpp runs).")] = None,
    quant: Annotated[Optional[str], typer.Option(help="Quant type FILE should be (checks the type mix).")] = None,
    force: Annotated[bool, typer.Option("--force", help="With the pipeline: check again even when the record "
                                        "is current.")] = False,
    as_json: JsonOption = False,
) -> None:
    """Check FILE: container, model, tensors, type mix, metadata and numerics against its source."""
    from moeq.validate.checks import validate_file

    if numerics not in ("sample", "full", "off"):
        raise InputError(f"--numerics {numerics!r}: use sample, full or off")
    if file is None and quant is not None:  # a quant of the ladder: the pipeline's file and source
        from moeq import steps

        ctx = open_context(config)
        done = steps.validate(ctx, ctx.pipeline.quant(quant), numerics, force=force)
        record = done.record
        if done.skipped and not as_json:
            console.print(f"{record.quant}: up to date (the record checked this file; --force to check again)",
                          soft_wrap=True)
        _report_checks(record.file.path, record.checks, record_json(record) if as_json else None)
        return
    if config is not None:
        raise InputError("--config needs --quant TYPE: which quant of the ladder to validate")
    if file is None:
        raise InputError("give a GGUF file, or --quant TYPE for a quant of the pipeline's ladder")
    _require_file(file)
    report = validate_file(file, against, numerics, arch, quant)
    _report_checks(str(file), report.checks, report.as_dict() if as_json else None)


def _report_checks(file: str, checks: list[dict], as_json: dict | None) -> None:
    """Print the checks (a table, or `as_json` when given) and fail when any check failed."""
    if as_json is not None:
        print_json(as_json)
    else:
        table = Table(title=f"validate {file}")
        for column in ("check", "result", "detail"):
            table.add_column(column, overflow="fold")
        for check in checks:
            table.add_row(check.name, "[green]pass[/]" if check.ok else "[red]FAIL[/]", check.detail)
        console.print(table)
    failed = [c.name for c in checks if not c.ok]
    if failed:
        raise CheckFailed(f"{file}: failed {', '.join(failed)}")


# ---------------------------------------------------------------- bench


@app.command()
@guard
def bench(
    config: ConfigOption = None,
    quant: QuantsOption = None,
    modes: Annotated[Optional[list[str]], typer.Option("--mode", "--modes", help="cpu, gpu, cpu-moe or N (-ncmoe N), repeatable; "
                                                       "default: bench.modes.")] = None,
    rpc: Annotated[Optional[str], typer.Option(help="HOST:PORT of a ggml-rpc-server to use as the offload "
                                               "device (for machines without a GPU), or local to start one; "
                                               "default: bench.rpc.")] = None,
    force: Annotated[bool, typer.Option(help="Measure again even when the record is current.")] = False,
    as_json: JsonOption = False,
) -> None:
    """Measure speed (llama-bench), buffers per device (llama-completion) and quality against F16 (llama-perplexity)."""
    from moeq import steps

    ctx = open_context(config)
    results, failed, measured = [], [], []
    for spec in selected_quants(ctx.pipeline, quant):
        done = steps.bench(ctx, spec, modes=tuple(modes) if modes else None, rpc=rpc, force=force)
        record = done.record
        results.append({"skipped": done.skipped, "record": record_json(record)})
        failed += [f"{spec.type} {e.mode}" for e in record.errors]
        measured += [f"{spec.type} {run.mode}" for run in record.speed] + ([f"{spec.type} quality"]
                                                                           if record.quality else [])
        if not as_json:
            _print_bench(record, done.skipped)
    if as_json:
        print_json(results)
    if failed:
        raise ToolError(f"bench recorded errors for {', '.join(failed)}; "
                        + (f"measured: {', '.join(measured)}" if measured else "nothing was measured")
                        + f" (see {ctx.ws.records_dir})")


def _print_bench(record, skipped: bool) -> None:
    machine = record.machine
    table = Table(title=f"{record.quant}: {'up to date' if skipped else 'measured'} on {machine.cpu}"
                        f"{', ' + machine.gpus[0].name if machine.gpus else ''}")
    for column in ("mode", "test", "tokens/s", "device model MiB (plan)", "device KV MiB (plan)"):
        table.add_column(column)
    memory = {m.mode: m for m in record.memory}
    for run in record.speed:
        mem = memory.get(run.mode)
        for test in run.tests:
            table.add_row(run.mode, test.test, f"{test.avg_ts:.1f} ± {test.stddev_ts:.1f}",
                          f"{mem.device_mib['model']} ({mem.planned_mib['model']})" if mem else "",
                          f"{mem.device_mib['KV']} ({mem.planned_mib['KV']})" if mem else "")
    console.print(table)
    if record.quality:
        q = record.quality.quant

        def fig(key: str, digits: int) -> str:
            value = getattr(q, key)
            return "unknown" if value is None else f"{value:.{digits}f}"

        console.print(f"quality: PPL {fig('ppl_q', 4)} vs F16 {fig('ppl_base', 4)}, mean KLD {fig('kld_mean', 6)}, "
                      f"same top token {fig('same_top_p', 2)} %")
    if record.not_measured:
        modes = ", ".join(m.mode for m in record.not_measured)
        console.print(f"{record.quant}: not measured: {modes} ({record.not_measured[0].reason}); to measure "
                      "them, run on a machine with an NVIDIA GPU and the CUDA build (scripts/setup --backend cuda) "
                      "or pass --rpc HOST:PORT (bench.rpc)", soft_wrap=True)
    for error in record.errors:  # the command's one error line (stderr) sums them up
        console.print(f"{record.quant} mode {error.mode} failed: {error.error}", soft_wrap=True)
