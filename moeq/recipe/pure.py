"""The per-type files a search assembles its recipes from: one `--pure` quantization of the source per type
(token_embd and output typed too), kept by what they are made from (WORKSPACE/recipe/pure/KEY/TYPE.gguf), so
every rung's search shares them; made only when missing or changed."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Callable

import gguf

from moeq.records import FetchRecord, ImatrixRef
from moeq.runner import run_tool
from moeq.workspace import Workspace, partial_file, require_free, write_json_atomic


def pure_files(ws: Workspace, tool, source: FetchRecord, imatrix: ImatrixRef | None, types: list[str],
               on_message: Callable[[str], None]) -> dict[str, Path]:
    """The `--pure` file of each type in `types`, made with `tool` (llama-quantize) where missing or changed."""
    key = hashlib.sha256(json.dumps([source.output.sha256, imatrix.sha256 if imatrix else None,
                                     tool.build.commit]).encode()).hexdigest()[:16]
    folder = ws.root / "recipe" / "pure" / key
    folder.mkdir(parents=True, exist_ok=True)
    made_path = folder / "made.json"
    made = json.loads(made_path.read_text()) if made_path.is_file() else {}
    out = {}
    for ggml_type in types:
        path = folder / f"{ggml_type}.gguf"
        with ws.lock(f"pure-{key}-{ggml_type}", on_wait=on_message):
            if not (path.is_file() and made.get(ggml_type) == ws.hashes.sha256(path)):
                on_message(f"llama-quantize --pure {ggml_type}")
                block, size = gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType[ggml_type]]
                weights = source.output.size / 2  # the F16 holds 2 bytes a weight
                require_free(folder, weights * size / block, f"the --pure {ggml_type} file")
                command = [str(tool.path), "--pure", "--token-embedding-type", ggml_type.lower(),
                           "--output-tensor-type", ggml_type.lower()]
                if imatrix is not None:
                    command += ["--imatrix", Path(imatrix.path).name]
                with partial_file(path) as partial:
                    run_tool([*command, str(Path(source.output.path).resolve()), str(partial.resolve()), ggml_type],
                             folder / f"{ggml_type}.log", cwd=Path(imatrix.path).resolve().parent if imatrix else None)
                made[ggml_type] = ws.hashes.sha256(path)
                write_json_atomic(made_path, made)
        out[ggml_type] = path
    return out
