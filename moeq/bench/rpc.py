"""A ggml-rpc-server on 127.0.0.1 for the length of a bench: llama.cpp's offload device without a GPU.

    with rpc_endpoint("local", Toolchain()) as address:
        bench_quant(pipeline, quant, ws, chain, rpc=address)
"""

from __future__ import annotations

import contextlib
import socket
import subprocess
import time
from typing import Iterator

from moeq.errors import ToolError
from moeq.runner import start_tool, stop_process
from moeq.toolchain import Toolchain

START_TIMEOUT_S = 30


@contextlib.contextmanager
def rpc_endpoint(setting: str | None, chain: Toolchain) -> Iterator[str | None]:
    """None stays None, HOST:PORT is used as it is, and "local" starts a server that stops afterwards."""
    if setting != "local":
        yield setting
        return
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    server = start_tool([str(chain.path("ggml-rpc-server")), "-H", "127.0.0.1", "-p", str(port)],
                        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)  # dies with moeq, SIGKILL too
    try:
        deadline = time.monotonic() + START_TIMEOUT_S
        while True:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                break
            except OSError:
                if server.poll() is not None or time.monotonic() > deadline:
                    raise ToolError("ggml-rpc-server", f"did not start on 127.0.0.1:{port}",
                        "check that the pinned build made it (moeq doctor) and the port is free") from None
                time.sleep(0.1)
        yield f"127.0.0.1:{port}"
    finally:
        stop_process(server)
