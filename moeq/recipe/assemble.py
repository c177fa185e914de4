"""A recipe's GGUF assembled tensor by tensor from `--pure` quantizations of one source, one file per type.

llama-quantize quantizes each tensor on its own (with its importance matrix entry), so the file it makes
from a source with `--pure --tensor-type-file RECIPE` holds, for every tensor, the bytes the `--pure`
file of that tensor's type holds. A search that measures many recipes therefore quantizes once per
type and assembles each candidate here, instead of quantizing every candidate. The metadata comes from
the pure file of the base type (general.file_type, the importance matrix's keys), the tensor infos and
data from the file of each tensor's type; the result equals llama-quantize's own file byte for byte
(tests/test_recipe.py), so a published recipe file rebuilds it with one llama-quantize command.

    assemble(Path("pure-Q2_K.gguf"), {"Q8_0": Path("pure-Q8_0.gguf")}, {"blk.0.attn_q.weight": "Q8_0"}, out)
"""

from __future__ import annotations

import struct
from pathlib import Path

from moeq.errors import InputError
from moeq.gguf_header import GGUFHeader, TensorInfo, read_header
from moeq.workspace import partial_file

CHUNK = 64 << 20  # bytes copied at a time: a tensor of a real model is gigabytes


def assemble(base: Path, per_type: dict[str, Path], types: dict[str, str], out: Path) -> None:
    """Write `out`: `base`'s metadata and tensors, each tensor named in `types` taken instead from the pure file
    of its type (`per_type`). Written to a partial file and renamed: a failure leaves nothing under `out`."""
    header = read_header(base)
    names = {t.name for t in header.tensors}
    unknown = sorted(set(types) - names)
    if unknown:
        raise InputError(base, f"no tensor {unknown[0]!r}", "the recipe names a tensor this model does not have")
    missing = sorted({t for t in types.values()} - set(per_type))
    if missing:
        raise InputError(base, f"no pure quantization for type {missing[0]} (the recipe uses it)",
                         "make one with llama-quantize --pure")
    sources = {ggml_type: read_header(path) for ggml_type, path in per_type.items()}
    tensors = {ggml_type: {t.name: t for t in source.tensors} for ggml_type, source in sources.items()}
    chosen: list[tuple[GGUFHeader, TensorInfo]] = []
    for tensor in header.tensors:
        ggml_type = types.get(tensor.name)
        source, picked = (sources[ggml_type], tensors[ggml_type].get(tensor.name)) if ggml_type else (header, tensor)
        if picked is None or picked.shape != tensor.shape:
            raise InputError(source.path, f"tensor {tensor.name!r} is missing or of another shape than in {base}",
                             "quantize every type from the same source")
        chosen.append((source, picked))
    with partial_file(out) as partial:
        _write(header, chosen, partial)


def _write(header: GGUFHeader, chosen: list[tuple[GGUFHeader, TensorInfo]], partial: Path) -> None:
    align = header.alignment
    infos, offset = [], 0
    for _source, tensor in chosen:
        name = tensor.name.encode()
        infos.append(struct.pack("<Q", len(name)) + name + struct.pack("<I", len(tensor.shape))
                     + b"".join(struct.pack("<Q", d) for d in tensor.shape)
                     + struct.pack("<IQ", int(tensor.type), offset))
        offset += _padded(tensor.n_bytes, align)
    with open(header.path, "rb") as f:
        metadata = f.read(header.infos_offset)
    head = metadata + b"".join(infos)
    with open(partial, "wb") as out:
        out.write(head + b"\0" * (_padded(len(head), align) - len(head)))
        for source, tensor in chosen:
            with open(source.path, "rb") as f:
                f.seek(source.data_offset + tensor.offset)
                left = tensor.n_bytes
                while left:
                    block = f.read(min(left, CHUNK))
                    if not block:
                        raise InputError(source.path, f"ends inside tensor {tensor.name!r}", "the file is cut short")
                    out.write(block)
                    left -= len(block)
            out.write(b"\0" * (_padded(tensor.n_bytes, align) - tensor.n_bytes))


def _padded(n: int, align: int) -> int:
    return -(-n // align) * align
