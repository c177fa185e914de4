"""A GGUF written tensor by tensor from other GGUF files: a recipe's file from the per-type files, or a per-type
file cut down to the tensors a search needs from it.

llama-quantize quantizes each tensor on its own (with its importance matrix entry), so the file it makes
from a source with `--pure --tensor-type-file RECIPE` holds, for every tensor, the bytes a `--pure`
file of that tensor's type holds. A search that measures many recipes therefore quantizes once per
type and assembles each candidate here, instead of quantizing every candidate. The metadata comes from
one file (the base type's: general.file_type, the importance matrix's keys), each tensor's info and data
from the file named beside it; the result equals llama-quantize's own file byte for byte
(tests/test_recipe.py), so a published recipe file rebuilds it with one llama-quantize command.

    assemble(Path("Q2_K.gguf"), [("token_embd.weight", Path("Q2_K.gguf")), ("output.weight", Path("Q6_K.gguf"))], out)
"""

from __future__ import annotations

import struct
from pathlib import Path

from moeq.errors import InputError
from moeq.gguf_header import GGUFHeader, TensorInfo, read_header
from moeq.workspace import partial_file

CHUNK = 64 << 20  # bytes copied at a time: a tensor of a real model is gigabytes
N_TENSORS_AT = 8  # the tensor count's place in a GGUF header (after the magic and the version), a uint64


def assemble(metadata_from: Path, tensors_from: list[tuple[str, Path]], out: Path,
             file_type: int | None = None) -> None:
    """Write `out`: the metadata of `metadata_from` (general.file_type set to `file_type` where given: llama-quantize
    writes the quant type it was told, the only metadata that differs between --pure files of one tensor type), then
    each tensor of `tensors_from` (name, the file that holds it at the type wanted), in that order. Written to a
    partial file and renamed: a failure leaves nothing under `out`."""
    headers: dict[Path, GGUFHeader] = {}
    infos: dict[Path, dict[str, TensorInfo]] = {}
    chosen: list[tuple[GGUFHeader, TensorInfo]] = []
    for name, path in tensors_from:
        if path not in headers:
            headers[path] = read_header(path)
            infos[path] = {t.name: t for t in headers[path].tensors}
        info = infos[path].get(name)
        if info is None:
            raise InputError(path, f"no tensor {name!r}", "the recipe names a tensor this file does not hold")
        chosen.append((headers[path], info))
    meta = headers.get(metadata_from) or read_header(metadata_from)
    with partial_file(out) as partial:
        _write(meta, chosen, partial, file_type)


FILE_TYPE_KEY = struct.pack("<Q", len(b"general.file_type")) + b"general.file_type" + struct.pack("<I", 4)  # uint32


def _write(meta: GGUFHeader, chosen: list[tuple[GGUFHeader, TensorInfo]], partial: Path, file_type: int | None) -> None:
    align = meta.alignment
    infos, offset = [], 0
    for _source, tensor in chosen:
        name = tensor.name.encode()
        infos.append(struct.pack("<Q", len(name)) + name + struct.pack("<I", len(tensor.shape))
                     + b"".join(struct.pack("<Q", d) for d in tensor.shape)
                     + struct.pack("<IQ", int(tensor.type), offset))
        offset += _padded(tensor.n_bytes, align)
    with open(meta.path, "rb") as f:
        metadata = bytearray(f.read(meta.infos_offset))
    metadata[N_TENSORS_AT:N_TENSORS_AT + 8] = struct.pack("<Q", len(chosen))
    if file_type is not None:
        at = metadata.find(FILE_TYPE_KEY)
        if at < 0:
            raise InputError(meta.path, "no general.file_type", "the per-type file is not llama-quantize's: delete it")
        at += len(FILE_TYPE_KEY)
        metadata[at:at + 4] = struct.pack("<I", file_type)
    head = bytes(metadata) + b"".join(infos)
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
