"""Every `>>>` example in moeq's docstrings runs as a doctest and gives what it shows.

Usage sketches that need a workspace, the tools or the Hub are written without the prompt (and with
`# -> ...` for what they give), so that no example reads as checked when it is not.
"""

from __future__ import annotations

import doctest
import importlib
import pkgutil

import pytest

import moeq

MODULES = sorted(m.name for m in pkgutil.walk_packages(moeq.__path__, "moeq.") if not m.name.endswith("__main__"))


@pytest.mark.parametrize("name", MODULES)
def test_docstring_examples_run(name):
    module = importlib.import_module(name)
    result = doctest.testmod(module, optionflags=doctest.ELLIPSIS)
    assert result.failed == 0, f"{name}: {result.failed} doctest example(s) failed"


def test_some_examples_are_run():
    attempted = sum(doctest.testmod(importlib.import_module(n)).attempted for n in ("moeq.units", "moeq.offload"))
    assert attempted >= 4
