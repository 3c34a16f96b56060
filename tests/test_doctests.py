"""The docstring examples of every scratchlm module run, and pass.

Module docstrings are the first thing a reader sees; an example that no longer runs is
worse than none. Each module is one test, so a failure names the module.
"""

import doctest
import importlib
import pkgutil

import pytest

import scratchlm

MODULES = sorted(name for _, name, _ in pkgutil.walk_packages(scratchlm.__path__, "scratchlm.")
                 if not name.endswith("__main__"))


def test_the_walk_finds_the_package():
    assert {"scratchlm.model", "scratchlm.config", "scratchlm.cli"} <= set(MODULES)


@pytest.mark.parametrize("name", MODULES)
def test_docstring_examples(name, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # an example that writes files writes them here
    module = importlib.import_module(name)
    result = doctest.testmod(module, optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE)
    assert result.failed == 0, f"{result.failed} of {result.attempted} examples failed in {name}"
