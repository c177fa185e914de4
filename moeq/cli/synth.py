"""`moeq synth`: synthetic models for demos and tests."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Annotated, Optional

import typer

from moeq.cli.options import JsonOption
from moeq.cli.output import console, show
from moeq.config import SynthSpec
from moeq.errors import InputError
from moeq.units import decimal_size

synth_app = typer.Typer(help="Make synthetic models for demos and tests.", no_args_is_help=True)


@synth_app.command("tiny-moe")
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
    show(as_json, result, lambda: console.print(f"wrote {path} ({decimal_size(result['bytes'])}, "
                                                f"{result['parameters']:,} parameters, {arch})"))


synth_app.command("tiny-phimoe", help="The tiny-moe command for phimoe: a deterministic F16 phimoe GGUF with "
                  "Phi-3.5-MoE's layout, scaled down or at its real dimensions (--preset phi-3.5-moe).")(
    synth_tiny_moe)


@synth_app.command("tiny-phimoe-hf")
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
            raise InputError(out, "not empty", "give a new folder for the trained checkpoint")
        shutil.copytree(trained_checkpoint(spec, on_message=lambda m: sys.stderr.write(m + "\n")), out,
                        dirs_exist_ok=True, ignore=shutil.ignore_patterns(".complete"))
        folder = out
    else:
        folder = write_tiny_phimoe_hf(out, spec)
    console.print(f"wrote {folder}: {', '.join(sorted(p.name for p in folder.iterdir()))}")
