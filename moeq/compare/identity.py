"""Whether a GGUF from elsewhere is a quantization of the same model as the F16: the same architecture, every
hyperparameter of it, the same vocabulary and the same tensors, names and shapes, read from the two headers before
any llama.cpp tool loads the other file. A quantization changes only the tensors' types and the keys it writes
itself (general.file_type, general.quantization_version, quantize.*).

    first_difference(read_header(f16), read_header(peer))
    # -> None, or "blk.0.ffn_up_exps.weight is [256, 512, 4], where the F16's is [256, 1024, 4]"
"""

from __future__ import annotations

from typing import NamedTuple

from gguf import Keys

from moeq.gguf_header import GGUFHeader

SHOWN = 60  # characters of a value from the other file shown in a message
VOCABULARY = (Keys.Tokenizer.LIST, Keys.Tokenizer.MODEL, Keys.Tokenizer.PRE, Keys.Tokenizer.TOKEN_TYPE,
              Keys.Tokenizer.MERGES, Keys.Tokenizer.BOS_ID, Keys.Tokenizer.EOS_ID)  # in the order they are compared


def shown(value: object) -> str:
    """A value from an untrusted header, as ASCII and bounded."""
    text = ascii(value)
    return text if len(text) <= SHOWN else text[:SHOWN] + "..."


def first_difference(f16: GGUFHeader, peer: GGUFHeader) -> str | None:
    """The first way `peer` is not a quantization of the model `f16` holds, in words; None when it is one."""
    arch = f16.architecture
    if peer.architecture != arch:
        return f"{Keys.General.ARCHITECTURE} is {shown(peer.architecture)}, where the F16's is {shown(arch)}"
    prefix = f"{arch}."
    for key in [*sorted({k for k in (*f16.metadata, *peer.metadata) if k.startswith(prefix)}), *VOCABULARY]:
        problem = _key_difference(f16, peer, key)
        if problem is not None:
            return problem
    ours = {t.name: t.shape for t in f16.tensors}
    theirs = {t.name: t.shape for t in peer.tensors}
    for name, shape in ours.items():
        if name not in theirs:
            return f"no tensor {shown(name)}, which the F16 has"
        if theirs[name] != shape:
            return f"{shown(name)} is {shown(theirs[name])}, where the F16's is {shape}"
    extra = next((name for name in theirs if name not in ours), None)
    if extra is not None:
        return f"a tensor {shown(extra)} the F16 does not have"
    return None


class _Array(NamedTuple):
    """A metadata array, compared by its item count and the digest of its items."""

    count: int
    sha256: str


def _value(header: GGUFHeader, key: str) -> object:
    value = header.metadata.get(key)
    return _Array(value[2], header.array_sha256[key]) if isinstance(value, tuple) else value


def _described(value: object) -> str:
    return f"an array of {value.count:,} items" if isinstance(value, _Array) else shown(value)


def _key_difference(f16: GGUFHeader, peer: GGUFHeader, key: str) -> str | None:
    ours, theirs = _value(f16, key), _value(peer, key)
    if ours == theirs:
        return None
    if isinstance(ours, _Array) and isinstance(theirs, _Array) and ours.count == theirs.count:
        return f"{key} holds other items than the F16's ({theirs.count:,} of them)"
    if theirs is None:
        return f"no {key} (the F16's is {_described(ours)})"
    if ours is None:
        return f"{key} is {_described(theirs)}, which the F16 does not have"
    return f"{key} is {_described(theirs)}, where the F16's is {_described(ours)}"
