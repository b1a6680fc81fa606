"""Every Python example in the README and the docs runs as written.

One substitution, named here: `megex.train_victim` trains each distinct victim once per test
session and gives every later example asking for it a copy of that one (the recipe is seeded,
so a second training would give the same weights; the recipes are tested in test_victim.py).
Several examples start by training the same digits victim, and the suite runs them on 2 cores.
"""

import copy
import re

import pytest
from docs_support import python_blocks

_TRAINED: dict[str, object] = {}


def _trained_once(train_victim):
    def trained(*args, **kwargs):
        kwargs.pop("progress", None)
        key = repr((args, sorted(kwargs.items())))
        if key not in _TRAINED:
            _TRAINED[key] = train_victim(*args, progress=False, **kwargs)
        return copy.deepcopy(_TRAINED[key])

    return trained


@pytest.mark.parametrize(
    ("where", "code"), [pytest.param(where, code, id=where) for where, code in python_blocks()]
)
def test_doc_python_examples_run(tmp_path, monkeypatch, capsys, where, code):
    import torch

    import megex

    torch.set_num_threads(1)
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(megex, "train_victim", _trained_once(megex.train_victim))
    exec(compile(code, where, "exec"), {})
    out = capsys.readouterr().out
    assert out.strip()
    if "class MyNet" in code:  # the Python API's first example
        assert "torch.Size([4, 10]) torch.Size([4, 10, 1, 8, 8]) 4" in out
        # MEGEX spent its budget (to within one iteration) and said which gradient it used.
        assert re.search(r"^megex 4[6-9]\d\d ", out, re.M) and "exact (all classes)" in out
