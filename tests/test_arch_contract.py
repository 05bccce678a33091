"""The common contract suite, run over every installed arch plugin (built-in or not)."""

import pytest

from lorakit.plugins import list_archs
from lorakit.testing import run_arch_contract

ARCHS = [row["id"] for row in list_archs() if row["status"] == "ok"]


def test_builtin_archs_all_load():
    broken = {r["id"]: r["error"] for r in list_archs() if r["status"] != "ok"}
    assert not broken, broken


@pytest.mark.parametrize("arch", ARCHS)
def test_arch_contract(arch, tmp_path):
    figures = run_arch_contract(arch, tmp_path)
    print(arch, figures)
