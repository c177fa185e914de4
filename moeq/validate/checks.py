"""Named checks that prove a quantized GGUF sound against its F16 source.

Each check returns a CheckResult (name, ok, detail); a check that cannot run because an
earlier one failed says so instead of raising.
"""

from __future__ import annotations

import concurrent.futures
import hashlib
import math
import os
from dataclasses import dataclass, field
from pathlib import Path

import gguf
from gguf import Keys
import numpy as np
from gguf.quants import dequantize

from moeq.architectures import require_moe
from moeq.errors import InputError
from moeq.gguf_header import GGUFHeader, check_extent, read_header
from moeq.validate.prompt import EXAMPLE, render_example
from moeq.records import CheckResult, PromptFormat

# The keys llama-quantize sets (src/llama-quant.cpp): every other key of the source is copied unchanged,
# except a split source's split.* keys, which it drops. A key the source lacks is not required.
QUANTIZATION_KEYS = (Keys.General.FILE_TYPE, Keys.General.QUANTIZATION_VERSION)
DROPPED_PREFIXES = ("split.", "GGUF.")  # GGUF.* are gguf-py's names for the header's own fields
# Relative RMSE bounds per tensor type: about twice the worst seen on the tiny model's gaussian
# weights with the pinned llama-quantize (Q8_0 0.0054, Q6_K 0.018, Q4_K 0.072, Q3_K 0.15, Q2_K 0.30).
# About twice the worst relative RMSE seen per tensor type on the tiny model's Gaussian weights (README, "Numerics
# bounds"); the ternary and 1-bit types at 1.0: no worse than a tensor of zeros.
RMSE_BOUNDS = {"Q8_0": 0.012, "Q6_K": 0.04, "Q5_K": 0.08, "Q5_1": 0.08, "Q5_0": 0.09, "Q4_K": 0.15, "Q4_1": 0.16,
               "Q4_0": 0.17, "IQ4_NL": 0.16, "IQ4_XS": 0.16, "MXFP4": 0.23, "Q3_K": 0.30, "IQ3_S": 0.33,
               "IQ3_XXS": 0.38, "IQ2_S": 0.52, "Q2_K": 0.50, "IQ2_XS": 0.62, "IQ2_XXS": 0.70, "IQ1_M": 1.0,
               "IQ1_S": 1.0, "TQ1_0": 1.0, "TQ2_0": 1.0}
SAMPLE_ROWS = 256
FULL_CHUNK_ROWS = 256  # rows per read in full mode: a few tens of MB per core at the real model's widths


@dataclass
class ValidateReport:
    file: str
    against: str | None
    checks: list[CheckResult] = field(default_factory=list)
    worst_tensors: list[dict] = field(default_factory=list)
    prompt: PromptFormat | None = None
    sampling: dict[str, float | int | str] = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        return all(c.ok for c in self.checks)

    def as_dict(self) -> dict:
        return {"ok": self.ok, "file": self.file, "against": self.against,
                "checks": [c.model_dump() for c in self.checks], "worst_tensors": self.worst_tensors}


def check_container(path: Path) -> tuple[CheckResult, GGUFHeader | None]:
    try:
        if Path(path).stat().st_size == 0:
            return CheckResult("container", False, "zero-byte file"), None
        header = read_header(path)
        check_extent(header)
    except InputError as exc:
        return CheckResult("container", False, str(exc).removeprefix(f"{path}: ")), None
    return CheckResult("container", True, f"GGUF v{header.version}, {len(header.tensors)} tensors, "
                                          f"alignment {header.alignment}, ends where the last tensor ends"), header


def check_model(header: GGUFHeader, source: GGUFHeader | None, expected_arch: str | None) -> CheckResult:
    """The architecture (the source's, or `expected_arch`), a mixture of experts llama.cpp runs, and every
    hyperparameter of it (each `<arch>.*` key of the source) equal to the source's."""
    arch = header.architecture
    if expected_arch is not None and arch != expected_arch:
        return CheckResult("model", False, f"architecture is {arch!r}, expected {expected_arch!r}")
    try:
        require_moe(header, "the file")
    except InputError as exc:
        return CheckResult("model", False, exc.message.removeprefix("the file: "))
    if source is None:
        return CheckResult("model", True, f"architecture {arch}; no source to compare hyperparameters with")
    keys = sorted({k for k in [*header.metadata, *source.metadata] if k.startswith(f"{arch}.")})
    differ = [f"{k}: {header.metadata.get(k)!r} != source {source.metadata.get(k)!r}"
              for k in keys if header.metadata.get(k) != source.metadata.get(k)]
    if differ:
        return CheckResult("model", False, "; ".join(differ))
    return CheckResult("model", True, f"architecture {arch}; its {len(keys)} hyperparameters equal the source's")


def check_tensors(header: GGUFHeader, source: GGUFHeader) -> CheckResult:
    ours = {t.name: t.shape for t in header.tensors}
    theirs = {t.name: t.shape for t in source.tensors}
    missing, extra = sorted(theirs.keys() - ours.keys()), sorted(ours.keys() - theirs.keys())
    reshaped = [f"{n} {ours[n]} != {theirs[n]}" for n in sorted(ours.keys() & theirs.keys()) if ours[n] != theirs[n]]
    problems = ([f"missing {', '.join(missing)}"] if missing else []) + \
               ([f"extra {', '.join(extra)}"] if extra else []) + \
               ([f"shape {', '.join(reshaped)}"] if reshaped else [])
    if problems:
        return CheckResult("tensors", False, "; ".join(problems))
    return CheckResult("tensors", True, f"{len(ours)} tensors, names and shapes equal the source's")


def _first_three(problems: list[str]) -> str:
    return "; ".join(problems[:3]) + (f" (+{len(problems) - 3} more)" if len(problems) > 3 else "")


def check_type_mix(header: GGUFHeader, quant: str, overrides: dict[str, str] | None = None,
                   ends: dict[str, str] | None = None, pure: bool = False,
                   expected: dict[str, str] | None = None) -> CheckResult:
    """Each tensor's type is the one llama.cpp gives it: `expected`, llama-quantize's own --dry-run of the source
    with the same type flags, where the caller has the tool (the validate stage); else the tables of typemix.py."""
    from moeq import quant_types
    from moeq.validate.typemix import allowed_types, keeps_source_type

    known = quant_types.lookup(quant)
    if known is None:
        return CheckResult("type mix", False, f"unknown quant type {quant!r}")
    file_type = header.metadata.get(Keys.General.FILE_TYPE)
    by_bytes: dict[str, int] = {}
    for t in header.tensors:
        by_bytes[t.type.name] = by_bytes.get(t.type.name, 0) + t.n_bytes
    mix = ", ".join(f"{k} {v / 2**20:.2f} MiB" for k, v in sorted(by_bytes.items(), key=lambda kv: -kv[1]))
    if file_type != known.file_type:
        return CheckResult("type mix", False, f"general.file_type is {file_type}, {known.name} is {known.file_type}; "
                                              f"types by bytes: {mix}")
    wrong = []
    for t in header.tensors:
        if keeps_source_type(t):
            if t.type != gguf.GGMLQuantizationType.F32:
                wrong.append(f"{t.name} is {t.type.name}, expected F32")
            continue
        if expected is not None:
            if t.type.name != expected.get(t.name):
                wrong.append(f"{t.name} is {t.type.name}, llama-quantize --dry-run of the source gives "
                             f"{expected.get(t.name, 'it no type (it keeps the source type)')}")
            continue
        allowed = allowed_types(known.name, t, header, overrides or {}, ends, pure)
        if allowed is not None and t.type not in allowed:
            wrong.append(f"{t.name} is {t.type.name}, the {known.name} {'recipe file' if pure else 'recipe'} gives "
                         f"{'/'.join(sorted(a.name for a in allowed))}")
    if wrong:
        return CheckResult("type mix", False, _first_three(wrong))
    return CheckResult("type mix", True, f"file_type {file_type} ({known.name}); {mix}")


def _field(reader: gguf.GGUFReader, key: str):
    f = reader.fields.get(key)
    return None if f is None else f.contents()


def check_metadata(header: GGUFHeader, reader: gguf.GGUFReader | None,
                   source: gguf.GGUFReader | None) -> CheckResult:
    absent = [k for k in QUANTIZATION_KEYS if k not in header.metadata]
    if absent:
        return CheckResult("metadata", False, f"missing {', '.join(absent)}, which llama-quantize sets")
    if source is None or reader is None:
        return CheckResult("metadata", True, "quantization keys present; no source to compare the rest with")
    carried = [k for k in source.fields if k not in QUANTIZATION_KEYS and not k.startswith(DROPPED_PREFIXES)]
    missing = [k for k in carried if k not in reader.fields]
    changed = [k for k in carried if k in reader.fields and _field(reader, k) != _field(source, k)]
    problems = ([f"lost from the source: {_first_three(missing)}"] if missing else []) + \
               ([f"changed from the source: {_first_three(changed)}"] if changed else [])
    if problems:
        return CheckResult("metadata", False, "; ".join(problems))
    return CheckResult("metadata", True, f"quantization keys present; the source's {len(carried)} other keys "
                                         "carried over unchanged")


CHAT_TEMPLATE = "tokenizer.chat_template"


def check_chat_template(reader: gguf.GGUFReader, source: gguf.GGUFReader | None
                        ) -> tuple[CheckResult, PromptFormat | None]:
    """The file's chat template is the source's (a template lost or changed on the way is the most common fault
    of a published GGUF), and an example conversation rendered with it for the card."""
    ours, theirs = _string(reader, CHAT_TEMPLATE), _string(source, CHAT_TEMPLATE) if source else None
    prompt = None
    if ours is not None:
        rendered, why_not = render_example(ours, _token(reader, "tokenizer.ggml.bos_token_id"),
                                           _token(reader, "tokenizer.ggml.eos_token_id"))
        prompt = PromptFormat(template_sha256=hashlib.sha256(ours.encode()).hexdigest(), template_chars=len(ours),
                              rendered=rendered, why_not=why_not, messages=[dict(m) for m in EXAMPLE])
    if source is None:
        return CheckResult("chat template", True, "no source to compare it with"), prompt
    if ours == theirs:
        detail = "neither the source nor this file has one" if ours is None else \
            f"the source's ({len(ours):,} characters, sha256 {prompt.template_sha256[:12]}), unchanged"
        return CheckResult("chat template", True, detail), prompt
    if ours is None:
        return CheckResult("chat template", False, "lost: the source has one, this file has none"), prompt
    if theirs is None:
        return CheckResult("chat template", False, "this file has one, the source has none"), prompt
    source_sha256 = hashlib.sha256(theirs.encode()).hexdigest()
    return CheckResult("chat template", False, f"differs from the source's (sha256 {prompt.template_sha256[:12]}, "
                                               f"the source's {source_sha256[:12]})"), prompt


SAMPLING_PREFIX = "general.sampling."
SAMPLING_KEYS = ("temp", "top_k", "top_p", "min_p", "penalty_repeat", "penalty_last_n", "xtc_probability",
                 "xtc_threshold", "mirostat", "mirostat_tau", "mirostat_eta", "sequence")


def sampling_defaults(reader: gguf.GGUFReader) -> dict[str, float | int | str]:
    """The file's general.sampling.* keys that llama.cpp reads, by their last part: numbers at float32's own
    precision (0.7, not 0.699999988), a sampler sequence of at most 200 characters; anything else is left out."""
    found: dict[str, float | int | str] = {}
    for name in SAMPLING_KEYS:
        value = _field(reader, SAMPLING_PREFIX + name)
        if isinstance(value, bool) or value is None:
            continue
        if isinstance(value, int) and abs(value) < 2 ** 31:
            found[name] = value
        elif isinstance(value, float) and math.isfinite(value):
            found[name] = float(f"{value:.7g}")
        elif isinstance(value, str) and len(value) <= 200 and value.isprintable():
            found[name] = value
    return found


def _string(reader: gguf.GGUFReader, key: str) -> str | None:
    value = _field(reader, key)
    return value if isinstance(value, str) else None


def _token(reader: gguf.GGUFReader, id_key: str) -> str:
    """The text of the token whose id `id_key` holds ("" when there is none)."""
    index, tokens = _field(reader, id_key), reader.fields.get("tokenizer.ggml.tokens")
    if not isinstance(index, int) or tokens is None or not 0 <= index < len(tokens.data):
        return ""
    return tokens.contents(index)


class _Rows:
    """Reads whole rows of one tensor with pread: memory stays bounded and no mapping grows."""

    def __init__(self, fh, header: GGUFHeader, tensor):
        block, type_size = gguf.GGML_QUANT_SIZES[tensor.type]
        self.fd, self.type = fh.fileno(), tensor.type
        self.ncols = tensor.shape[0]
        self.row_bytes = self.ncols // block * type_size
        self.n_rows = tensor.n_elements // self.ncols
        self.base = header.data_offset + tensor.offset

    def read(self, start: int, count: int) -> np.ndarray:
        raw = os.pread(self.fd, self.row_bytes * count, self.base + start * self.row_bytes)
        rows = np.frombuffer(raw, dtype=np.uint8).reshape(count, self.row_bytes)
        return dequantize(rows, self.type).reshape(count, self.ncols).astype(np.float32, copy=False)


def _compare(ours: _Rows, theirs: _Rows, mode: str) -> tuple[float | None, bool]:
    """(relative RMSE of `ours` against `theirs`, all values finite); (None, True) when their rows differ."""
    if ours.n_rows != theirs.n_rows:
        return None, True
    err = ref = 0.0
    finite = True
    for start, count in _spans(ours.n_rows, mode):
        a, b = ours.read(start, count).ravel(), theirs.read(start, count).ravel()
        finite &= bool(np.isfinite(a).all())
        diff = a - b
        err += float(np.vdot(diff, diff))
        ref += float(np.vdot(b, b))
    return ((err / ref) ** 0.5 if ref > 0 else (0.0 if err == 0 else float("inf"))), finite


def _spans(n_rows: int, mode: str) -> list[tuple[int, int]]:
    if mode == "sample":
        picks = np.unique(np.linspace(0, n_rows - 1, num=min(SAMPLE_ROWS, n_rows)).astype(int))
        return [(int(i), 1) for i in picks]
    return [(i, min(FULL_CHUNK_ROWS, n_rows - i)) for i in range(0, n_rows, FULL_CHUNK_ROWS)]


def check_numerics(header: GGUFHeader, source: GGUFHeader, mode: str) -> tuple[CheckResult, list[dict]]:
    """Each tensor dequantized against its source: tensors compared side by side, one per core (numpy's
    dequantizing and sums release the GIL); each reads whole rows with pread, so memory stays bounded."""
    src = {t.name: t for t in source.tensors}
    results, failures = [], []
    with open(header.path, "rb") as ours_fh, open(source.path, "rb") as theirs_fh, \
            concurrent.futures.ThreadPoolExecutor(max_workers=os.cpu_count() or 1) as pool:
        compared = [(t, pool.submit(_compare, _Rows(ours_fh, header, t), _Rows(theirs_fh, source, src[t.name]), mode))
                    for t in header.tensors if t.name in src]
        for t, future in compared:  # in the file's order, whatever order they finish in
            try:
                rel, finite = future.result()
            except NotImplementedError:
                failures.append(f"{t.name}: gguf-py cannot dequantize {t.type.name}, so its numerics cannot be "
                                "checked")
                continue
            if rel is None:
                failures.append(f"{t.name}: row count differs from the source")
                continue
            bound = RMSE_BOUNDS.get(t.type.name)
            results.append({"name": t.name, "type": t.type.name, "rel_rmse": rel, "bound": bound})
            if not finite:
                failures.append(f"{t.name}: NaN or Inf after dequantizing")
            elif bound is not None and not rel <= bound:
                failures.append(f"{t.name}: relative RMSE {rel:.4f} above the {t.type.name} bound {bound}")
    worst = sorted(results, key=lambda r: -r["rel_rmse"] if r["rel_rmse"] == r["rel_rmse"] else float("-inf"))[:5]
    if failures:
        return CheckResult("numerics", False, _first_three(failures)), worst
    top = worst[0] if worst else None
    detail = f"{len(results)} tensors compared ({mode}), no NaN/Inf"
    if top:
        detail += f"; worst {top['name']} {top['type']} {top['rel_rmse']:.4f}"
    return CheckResult("numerics", True, detail), worst


def validate_file(path: Path, against: Path | None = None, numerics: str = "sample",
                  expected_arch: str | None = None, quant: str | None = None,
                  overrides: dict[str, str] | None = None, ends: dict[str, str] | None = None,
                  pure: bool = False, expected: dict[str, str] | None = None) -> ValidateReport:
    """Run every check on `path` (and against `against`, the F16 source, when given)."""
    report = ValidateReport(str(path), str(against) if against else None)
    container, header = check_container(path)
    report.checks.append(container)
    source_header = None
    if against is not None:
        source_check, source_header = check_container(against)
        if not source_check.ok:
            raise InputError(against, f"the source to compare with is not a sound GGUF ({source_check.detail})",
                         "fetch the source again (moeq fetch --force)")
    if header is None:
        return report
    if expected_arch is None and source_header is not None:  # the source's architecture
        expected_arch = source_header.architecture
    report.checks.append(check_model(header, source_header, expected_arch))
    if source_header is not None:
        report.checks.append(check_tensors(header, source_header))
    if quant is not None:
        report.checks.append(check_type_mix(header, quant, overrides, ends, pure, expected))
    reader = source_reader = None
    if against is not None:  # the tokenizer and template are compared value by value with gguf-py
        try:
            reader = gguf.GGUFReader(path)
        except Exception as exc:  # gguf-py raises many kinds on damaged metadata
            report.checks.append(CheckResult("metadata", False, f"gguf-py cannot read it "
                                                                f"({exc.__class__.__name__}: {str(exc)[:120]})"))
            return report
        source_reader = gguf.GGUFReader(against)
    report.checks.append(check_metadata(header, reader, source_reader))
    if reader is not None:
        chat, report.prompt = check_chat_template(reader, source_reader)
        report.checks.append(chat)
        report.sampling = sampling_defaults(reader)
    reader = source_reader = None  # gguf-py's parsed vocabularies (tens of MB each): freed before the numerics
    if numerics != "off" and source_header is not None and all(c.ok for c in report.checks):
        result, report.worst_tensors = check_numerics(header, source_header, numerics)
        report.checks.append(result)
    return report
