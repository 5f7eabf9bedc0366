"""python -m dinocxr_fast.selfcheck: every fused op at the tiny model's shapes, verified and timed, one table."""
from __future__ import annotations

import json

import pytest

from dinocxr_fast import selfcheck
from dinocxr_fast.ops import _dispatch


@pytest.fixture(autouse=True)
def fresh(tmp_path, monkeypatch):
    monkeypatch.setenv("DINOCXR_CACHE_DIR", str(tmp_path / "cache"))
    _dispatch.reset()
    yield
    _dispatch.reset()


def test_quick_cpu_selfcheck_lists_every_op_with_its_verdicts(tmp_path, capsys):
    out = tmp_path / "selfcheck.json"
    assert selfcheck.main(["--device", "cpu", "--quick", "--json", str(out)]) == 0
    report = json.loads(out.read_text())
    rows = report["rows"]
    assert {r["op"] for r in rows} == {"attention", "window_attention", "conv_bn_act", "pcm", "dino_loss"}
    for r in rows:
        assert r["chosen"] in ("torch", "cpp")
        assert r["max_err"] is not None and r["max_err"] < 1e-3  # the chosen path matched the reference
        if r["op"] in ("pcm", "dino_loss") and r["chosen"] == "torch":
            assert "cpp" in r["refused"]  # a custom backend not taken always says why
    assert report["environment"]["torch"]
    table = capsys.readouterr().out
    assert table.startswith("selfcheck on ") and "| op | shape | dtype | chosen |" in table


def test_cuda_requested_without_a_gpu_is_a_clear_error(capsys, monkeypatch):
    monkeypatch.setattr(selfcheck.torch.cuda, "is_available", lambda: False)
    assert selfcheck.main(["--device", "cuda", "--quick"]) == 2
    assert "no CUDA GPU" in capsys.readouterr().err
