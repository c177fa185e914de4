"""The NVIDIA GPUs of this machine, as nvidia-smi lists them (none where it is absent or fails).

    nvidia_gpus()
    # -> [{'name': 'NVIDIA H200', 'memory_bytes': 150754820096}]
"""

from __future__ import annotations

import shutil
import subprocess


def nvidia_gpus() -> list[dict]:
    """Name and memory of each NVIDIA GPU."""
    smi = shutil.which("nvidia-smi")
    if smi is None:
        return []
    try:
        out = subprocess.run([smi, "--query-gpu=name,memory.total", "--format=csv,noheader,nounits"],
                             capture_output=True, text=True, timeout=30, check=True).stdout
    except (OSError, subprocess.SubprocessError):
        return []
    gpus = []
    for line in out.strip().splitlines():
        name, _, mib = line.rpartition(",")
        if name.strip():
            gpus.append({"name": name.strip(), "memory_bytes": int(float(mib)) * 2**20 if mib.strip() else None})
    return gpus
