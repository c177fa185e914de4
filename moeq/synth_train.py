"""A tiny PhiMoE that has learned something, so quality figures on it mean something.

Random weights give a perplexity near the vocabulary size and a KL divergence near zero for every quant.
This trains the tiny checkpoint (synth_hf's layout) with transformers' PhimoeForCausalLM on the CPU,
on the Devil's Dictionary (moeq/data/training-text.txt, public domain, disjoint from the evaluation
text), for a fixed number of seeded steps: a few minutes on 2 cores. The tokenizer is trained on the
same text. Trained checkpoints are cached under the moeq cache, keyed by the spec, the training
settings, the text and the code that decides the weights (its syntax, without docstrings, comments, error
and progress messages), so a machine trains each one once and an edited message retrains nothing.

    trained_checkpoint(SynthSpec(vocab=512), on_message=print)
    # -> ~/.cache/moeq/trained/<key>/hf  (config.json, model.safetensors, tokenizer.model, ...)
"""

from __future__ import annotations

import ast
import hashlib
import json
import math
import os
import shutil
import time
from dataclasses import asdict
from importlib import resources
from pathlib import Path
from typing import Callable

import numpy as np

from moeq.config import SynthSpec
from moeq.errors import InputError
from moeq.synth_hf import hf_config, hf_tensor_names, train_tokenizer, write_tiny_phimoe_hf
from moeq.toolchain import cache_dir

STEPS = 1200
SEQUENCE = 256
BATCH = 8
LEARNING_RATE = 3e-3
WARMUP = 50


def training_text() -> Path:
    return Path(str(resources.files("moeq") / "data" / "training-text.txt"))


def training_key(spec: SynthSpec) -> str:
    """What the trained weights depend on: the spec, the settings, the code that trains and writes them, the text."""
    code = [Path(module).read_text() for module in (__file__, resources.files("moeq") / "synth_hf.py")]
    settings = {"spec": asdict(spec), "steps": STEPS, "sequence": SEQUENCE, "batch": BATCH, "lr": LEARNING_RATE,
                "warmup": WARMUP, "code": weights_code_sha256(code, USED_FROM_SYNTH_HF),
                "text": hashlib.sha256(training_text().read_bytes()).hexdigest()}
    return hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:16]


# What training takes from synth_hf (the random weights it writes for tests are not among them).
USED_FROM_SYNTH_HF = frozenset({"hf_config", "hf_tensor_names", "train_tokenizer", "write_tiny_phimoe_hf"})


def weights_code_sha256(sources: list[str], used: frozenset[str] = USED_FROM_SYNTH_HF) -> str:
    """sha256 of the modules' syntax trees without what cannot change a weight: docstrings, comments, the
    messages of raised errors and of on_message(...) calls, and (in every module after the first) the functions
    that are not `used`."""
    trees = []
    for index, source in enumerate(sources):
        tree = ast.parse(source)
        if index:
            tree.body = [node for node in tree.body
                         if not isinstance(node, ast.FunctionDef) or node.name in used]
        for node in ast.walk(tree):
            body = getattr(node, "body", None)
            if (isinstance(body, list) and body and isinstance(body[0], ast.Expr)
                    and isinstance(body[0].value, ast.Constant) and isinstance(body[0].value.value, str)):
                node.body = body[1:] or [ast.Pass()]
            if isinstance(node, ast.Raise):
                node.exc, node.cause = None, None
            if isinstance(node, ast.Call) and getattr(node.func, "id", None) == "on_message":
                node.args, node.keywords = [], []
        trees.append(ast.dump(tree, annotate_fields=False))
    return hashlib.sha256("\n".join(trees).encode()).hexdigest()


def trained_checkpoint(spec: SynthSpec, on_message: Callable[[str], None] = lambda _msg: None) -> Path:
    """The trained checkpoint folder for `spec`, from the cache, trained there first when missing."""
    folder = cache_dir() / "trained" / training_key(spec)
    done = folder / "hf" / ".complete"
    if done.is_file():
        return folder / "hf"
    partial = folder / f"hf.partial-{os.getpid()}"
    shutil.rmtree(partial, ignore_errors=True)
    on_message(f"training the tiny model ({STEPS} steps on the CPU, once per machine; cached in {folder})")
    train_tiny_phimoe(partial, spec, on_message)
    (partial / ".complete").write_text("")
    shutil.rmtree(folder / "hf", ignore_errors=True)
    os.replace(partial, folder / "hf")
    return folder / "hf"


def train_tiny_phimoe(folder: Path, spec: SynthSpec, on_message: Callable[[str], None] = lambda _msg: None) -> Path:
    """Train the checkpoint into `folder`: the same spec on the same machine gives the same weights."""
    try:
        import sentencepiece as spm
        import torch
        from transformers import PhimoeConfig, PhimoeForCausalLM
    except ImportError:
        raise InputError("moeq synth --train", "training the tiny model needs torch, transformers and sentencepiece",
                         "install moeq's convert extra (pip install 'moeq[convert]', or .venv/bin/pip install -e "
                         "'.[convert]' in a checkout)") from None
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()  # the longrope config notes are about real-sized contexts
    text = training_text().read_text()
    tokenizer = train_tokenizer([line for line in text.splitlines() if line.strip()], spec.vocab)
    sp = spm.SentencePieceProcessor(model_proto=tokenizer)
    ids = torch.tensor(sp.encode(text), dtype=torch.long)
    torch.manual_seed(spec.seed)
    config = {k: v for k, v in hf_config(spec).items() if k not in ("architectures", "model_type", "torch_dtype")}
    model = PhimoeForCausalLM(PhimoeConfig(**config))
    model.train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=LEARNING_RATE, betas=(0.9, 0.95), weight_decay=0.1)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: min(1.0, (step + 1) / WARMUP) * (
        0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(step, STEPS) / STEPS))))
    generator = torch.Generator().manual_seed(spec.seed)
    started = time.monotonic()
    for step in range(STEPS):
        starts = torch.randint(0, len(ids) - SEQUENCE - 1, (BATCH,), generator=generator)
        batch = torch.stack([ids[s:s + SEQUENCE] for s in starts.tolist()])
        loss = model(input_ids=batch, labels=batch).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        schedule.step()
        optimizer.zero_grad(set_to_none=True)
        if step % 100 == 99 or step == STEPS - 1:
            on_message(f"training: step {step + 1}/{STEPS}, loss {loss.item():.3f}, "
                       f"{time.monotonic() - started:.0f} s")
    state = {name: tensor.detach().float().numpy() for name, tensor in model.state_dict().items()}
    weights = {name: value.astype(np.float16) for name, value in hf_tensor_names(state, spec).items()}
    return write_tiny_phimoe_hf(folder, spec, weights=weights, tokenizer=tokenizer)

