"""Where the weights go: the one vocabulary of offload modes, shared by the plan, the bench, the cards,
the pipeline file and the command line.

- `cpu`: everything in system RAM (`-ngl 0`), measured on every machine;
- `gpu`: every layer on the GPU (`-ngl 99`);
- `cpu-moe`: every layer on the GPU, every expert tensor in system RAM (`--cpu-moe`);
- `ncmoe N`: the experts of the first N layers in system RAM (`-ncmoe N`).

    >>> OffloadMode.from_setting("2", n_layer=32).flags
    '-ngl 99 -ncmoe 2'
    >>> OffloadMode.for_layers(32, n_layer=32).name
    'cpu-moe'
"""

from __future__ import annotations

from dataclasses import dataclass

SETTINGS = ("cpu", "gpu", "cpu-moe")  # as pipeline.yaml and --modes name them; an integer N is `ncmoe N`
# name -> (label, flags as a reader types them, cell of a "what fits" table); `ncmoe N` is built from N
_FIXED = {
    "cpu": ("everything in system RAM, no GPU", "-ngl 0", "no GPU"),
    "gpu": ("all layers on the GPU", "-ngl 99", "all on the GPU"),
    "cpu-moe": ("all experts in system RAM", "-ngl 99 --cpu-moe", "--cpu-moe"),
}


def is_setting(value: object) -> bool:
    """A mode as pipeline.yaml or --modes may give it: cpu, gpu, cpu-moe, or an integer N >= 0."""
    if isinstance(value, bool):
        return False
    return value in SETTINGS or (isinstance(value, int) and value >= 0) or (isinstance(value, str) and value.isdigit())


MODE_HINT = "use cpu, gpu, cpu-moe, or an integer N for -ncmoe N"  # the fix of a bad mode


def require_settings(values, where: str) -> None:
    """Refuse a mode that is not a setting, naming where it was given (--modes, bench.modes)."""
    from moeq.errors import InputError

    for value in values:
        if not is_setting(value):
            raise InputError(f"{where} {value!r}", "not an offload mode", MODE_HINT)


@dataclass(frozen=True)
class OffloadMode:
    name: str  # "cpu", "gpu", "cpu-moe" or "ncmoe N"
    n_cpu_moe: int  # layers whose expert tensors stay in system RAM
    n_layer: int | None = None  # the model's block count, when known (for labels)

    @classmethod
    def from_setting(cls, setting: str | int, n_layer: int) -> OffloadMode:
        if setting in ("cpu", "gpu"):
            return cls(str(setting), 0, n_layer)
        if setting == "cpu-moe":
            return cls("cpu-moe", n_layer, n_layer)
        return cls(f"ncmoe {int(setting)}", min(int(setting), n_layer), n_layer)

    @classmethod
    def for_layers(cls, n: int, n_layer: int) -> OffloadMode:
        """The mode that keeps the experts of the first `n` layers in system RAM: gpu, ncmoe N or cpu-moe."""
        if n == 0:
            return cls("gpu", 0, n_layer)
        if n == n_layer:
            return cls("cpu-moe", n, n_layer)
        return cls(f"ncmoe {n}", n, n_layer)

    @classmethod
    def from_name(cls, name: str, n_layer: int | None = None) -> OffloadMode:
        """The mode a record names ("cpu", "gpu", "cpu-moe", "ncmoe N")."""
        if name in ("cpu", "gpu"):
            return cls(name, 0, n_layer)
        if name == "cpu-moe":
            return cls(name, n_layer or 0, n_layer)
        n = int(name.split()[-1])
        return cls(name, min(n, n_layer) if n_layer is not None else n, n_layer)

    @property
    def offload(self) -> bool:
        """Whether the mode puts weights on an offload device (a GPU, or an RPC device standing in for one)."""
        return self.name != "cpu"

    @property
    def label(self) -> str:
        if self.name in _FIXED:
            return _FIXED[self.name][0]
        of = f" of {self.n_layer}" if self.n_layer is not None else ""
        return f"experts of the first {self.n_cpu_moe}{of} layers in system RAM"

    @property
    def flags(self) -> str:
        """The llama.cpp flags, as a reader types them."""
        return _FIXED[self.name][1] if self.name in _FIXED else f"-ngl 99 -ncmoe {self.n_cpu_moe}"

    @property
    def advice(self) -> str:
        """The mode in a cell of a "what fits" table."""
        return _FIXED[self.name][2] if self.name in _FIXED else f"-ncmoe {self.n_cpu_moe}"

    @property
    def bench_flags(self) -> list[str]:
        """llama-bench's: -ncmoe for every offload mode (it has no --cpu-moe)."""
        return ["-ngl", "0"] if not self.offload else ["-ngl", "99", "-ncmoe", str(self.n_cpu_moe)]

    @property
    def completion_flags(self) -> list[str]:
        """llama-completion's, with `-fit off` so llama.cpp does not move layers on its own."""
        if not self.offload:
            return ["-ngl", "0", "-fit", "off"]
        base = ["-ngl", "99", "-fit", "off"]
        if self.name == "cpu-moe":
            return base + ["--cpu-moe"]
        return base + (["-ncmoe", str(self.n_cpu_moe)] if self.n_cpu_moe else [])
