"""The hostile adapter corpus (tests/core/hostile_adapters.py): every broken folder is refused
with an error naming the field, key or file, within a time bound, the model bit-identical;
the positive controls load. All cases run in one child process, so a hang fails its case
instead of blocking the suite."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))
import hostile_adapters as corpus  # noqa: E402

CASES = corpus.cases()


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    root = tmp_path_factory.mktemp("hostile")
    jobs = [(corpus.build(case, root), case.model) for case in CASES]
    return dict(zip([c.ident for c in CASES], corpus.run_all(jobs), strict=True))


def test_corpus_covers_every_class():
    classes = {c.cls for c in CASES}
    assert classes >= {"json", "types", "range", "values", "shapes", "dtypes", "keys"}
    assert classes >= {"files", "symlinks", "pickles", "regex", "peft", "base", "valid"}
    assert len({c.ident for c in CASES}) == len(CASES)


@pytest.mark.parametrize("case", CASES, ids=[c.ident for c in CASES])
def test_hostile_adapter(results, case):
    result = results[case.ident]
    assert corpus.verdict(case, result) is None, result


def test_the_runner_sees_a_hang_and_a_changed_model(tmp_path):
    """The verdicts can fail: a child that never answers is a hang, and a load that succeeds
    is 'loaded' for a hostile case."""
    case = corpus.Case("json", "x", "gpt2", None, "anything")
    assert corpus.verdict(case, {"error": "hang", "message": "", "seconds": 60}).startswith("hang")
    loaded = {"error": None, "message": "", "seconds": 0.1, "unchanged": False}
    assert corpus.verdict(case, loaded) == "loaded"
    changed = {"error": "ValueError", "message": "anything", "seconds": 0.1, "unchanged": False}
    assert corpus.verdict(case, changed) == "model changed"
