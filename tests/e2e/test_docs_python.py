"""Every Python example in the README and the docs runs as written."""

import re

import pytest
from docs_support import python_blocks


@pytest.mark.parametrize(
    ("where", "code"), [pytest.param(where, code, id=where) for where, code in python_blocks()]
)
def test_doc_python_examples_run(tmp_path, monkeypatch, capsys, where, code):
    import torch

    torch.set_num_threads(1)
    monkeypatch.chdir(tmp_path)
    exec(compile(code, where, "exec"), {})
    out = capsys.readouterr().out
    assert out.strip()
    if "class MyNet" in code:  # the Python API's first example
        assert "torch.Size([4, 10]) torch.Size([4, 10, 1, 8, 8]) 4" in out
        # MEGEX spent its budget (to within one iteration) and said which gradient it used.
        assert re.search(r"^megex 4[6-9]\d\d ", out, re.M) and "exact (all classes)" in out
