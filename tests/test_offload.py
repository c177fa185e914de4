"""The one offload-mode vocabulary: the names records use, the flags readers type, the labels cards show."""

from __future__ import annotations

import pytest

from moeq.offload import OffloadMode, is_setting


@pytest.mark.parametrize("setting,name,n,flags,bench,advice", [
    ("cpu", "cpu", 0, "-ngl 0", ["-ngl", "0"], "no GPU"),
    ("gpu", "gpu", 0, "-ngl 99", ["-ngl", "99", "-ncmoe", "0"], "all on the GPU"),
    ("cpu-moe", "cpu-moe", 32, "-ngl 99 --cpu-moe", ["-ngl", "99", "-ncmoe", "32"], "--cpu-moe"),
    ("5", "ncmoe 5", 5, "-ngl 99 -ncmoe 5", ["-ngl", "99", "-ncmoe", "5"], "-ncmoe 5"),
    ("40", "ncmoe 40", 32, "-ngl 99 -ncmoe 32", ["-ngl", "99", "-ncmoe", "32"], "-ncmoe 32"),
])
def test_a_setting_is_one_mode_everywhere(setting, name, n, flags, bench, advice):
    mode = OffloadMode.from_setting(setting, n_layer=32)
    assert (mode.name, mode.n_cpu_moe, mode.flags, mode.bench_flags, mode.advice) == (name, n, flags, bench, advice)
    assert OffloadMode.from_name(mode.name, 32).n_cpu_moe == min(int(setting) if setting.isdigit() else n, 32)


def test_layers_name_the_plan_s_placements():
    assert [OffloadMode.for_layers(n, 3).name for n in range(4)] == ["gpu", "ncmoe 1", "ncmoe 2", "cpu-moe"]
    assert OffloadMode.for_layers(2, 3).label == "experts of the first 2 of 3 layers in system RAM"
    assert OffloadMode.for_layers(3, 3).completion_flags == ["-ngl", "99", "-fit", "off", "--cpu-moe"]
    assert [is_setting(v) for v in ("cpu", "gpu", "cpu-moe", 3, "3", "fast", -1, True)] == \
        [True, True, True, True, True, False, False, False]
