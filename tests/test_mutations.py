"""tools/mutations.py stays runnable: each mutation's code occurs exactly once in its file, and
the tests that guard it exist (a refactor that moves either leaves a mutation that breaks
nothing, or guards nothing)."""

from pathlib import Path

import pytest

from tools.mutations import MUTATIONS

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("name", sorted(MUTATIONS))
def test_each_mutation_finds_its_code_once_and_its_guarding_tests(name):
    m = MUTATIONS[name]
    assert (ROOT / m.file).read_text().count(m.old) == 1, f"{name}: its code is not once in {m.file}"
    missing = [t for t in m.tests if not (ROOT / t.split("::")[0]).exists()]
    assert not missing, f"{name}: no such tests: {missing}"
