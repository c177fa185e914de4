"""The fast header reader agrees with gguf-py and refuses damaged files with a clear message."""

from __future__ import annotations

import shutil

import gguf
import pytest

from moeq.errors import InputError
from moeq.gguf_header import check_extent, read_header


def test_agrees_with_gguf_reader(tiny_model):
    header = read_header(tiny_model)
    check_extent(header)
    reader = gguf.GGUFReader(tiny_model)
    assert [(t.name, t.shape, t.type, t.n_bytes) for t in header.tensors] == \
           [(t.name, [int(x) for x in t.shape], t.tensor_type, int(t.n_bytes)) for t in reader.tensors]
    assert header.data_offset == reader.data_offset
    assert header.metadata["general.architecture"] == "phimoe"
    assert header.metadata["phimoe.expert_count"] == 4
    assert header.metadata["tokenizer.ggml.tokens"] == ("array", "STRING", 512)


def test_truncated_file(tiny_model, tmp_path):
    cut = tmp_path / "cut.gguf"
    cut.write_bytes(tiny_model.read_bytes()[:-1000])
    with pytest.raises(InputError, match=r"ends at byte \d+, past the end of the file .*the file is truncated"):
        check_extent(read_header(cut))


def test_junk_after_the_last_tensor(tiny_model, tmp_path):
    padded = tmp_path / "padded.gguf"
    shutil.copy(tiny_model, padded)
    with open(padded, "ab") as fh:
        fh.write(b"\0" * 4096)
    with pytest.raises(InputError, match="4096 unexpected bytes after the last tensor"):
        check_extent(read_header(padded))


@pytest.mark.parametrize("data,message", [
    (b"", "not a GGUF file"),
    (b"\x89PNG\r\n\x1a\n", "not a GGUF file"),
    (b"GGUF\x09\0\0\0" + b"\0" * 16, "GGUF version 9 is not supported"),
    (b"GGUF\x03\0\0\0" + b"\xff" * 16, "the file is corrupt"),
    (b"GGUF\x03\0\0\0\x01\0\0\0\0\0\0\0\x00\0\0\0\0\0\0\0", "GGUF header is truncated"),
])
def test_bad_headers(tmp_path, data, message):
    path = tmp_path / "bad.gguf"
    path.write_bytes(data)
    with pytest.raises(InputError, match=message) as info:
        read_header(path)
    assert str(info.value).startswith(str(path))
