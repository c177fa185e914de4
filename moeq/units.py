"""The one way moeq writes a byte count for people, in the CLI and on the card alike: memory (RAM, VRAM, KV cache,
buffers) in binary units as llama.cpp prints them; files and disk in decimal units as the Hub shows them.

    >>> binary_size(1_578_000_000)
    '1.47 GiB'
    >>> decimal_size(2_170_000_000)
    '2.17 GB'
"""

from __future__ import annotations

MIB = 2**20


def binary_size(n: int | float) -> str:
    """Bytes in llama.cpp's binary units: 1,578,000,000 -> '1.47 GiB'."""
    for unit, scale in (("TiB", 2**40), ("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if abs(n) >= scale:
            return f"{n / scale:.2f} {unit}"
    return f"{n} B"


def decimal_size(n: int | float) -> str:
    """Bytes in the Hub's decimal units: 2,170,000,000 -> '2.17 GB'."""
    for unit, scale in (("TB", 10**12), ("GB", 10**9), ("MB", 10**6), ("kB", 10**3)):
        if abs(n) >= scale:
            return f"{n / scale:.2f} {unit}"
    return f"{n} B"


def short_count(n: int) -> str:
    """41,873,153,472 -> '41.9B'; 3,807,808 -> '3.8M'."""
    for unit, scale in (("T", 10**12), ("B", 10**9), ("M", 10**6), ("K", 10**3)):
        if n >= scale:
            return f"{n / scale:.1f}{unit}"
    return str(n)
