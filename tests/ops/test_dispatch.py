"""The one dispatch rule (ops/_dispatch.py): unverified means vendor; a custom backend that is wrong,
raises, returns NaN, is slower, hangs or crashes is refused with its reason and the run goes on
with the right numbers; the verdict cache survives corruption and other versions; a backend that
raises mid-run is demoted. The fake op is tests/ops/dispatch_fakes.py."""
from __future__ import annotations

import dataclasses
import importlib
import json
import logging
import math
import warnings

import pytest
import torch

import dispatch_fakes as fakes
from dinocxr_fast import _ext
from dinocxr_fast.ops import _dispatch, _verdict_cache, _verify

pytestmark = pytest.mark.skipif(not _ext.has_cpp(), reason="the fake op's custom backend is named cpp: needs the "
                                "extension built (python setup.py build_ext --inplace)")
CPU = torch.device("cpu")
CASE = {"batch": 3, "n": 5, "dtype": "float32"}


@pytest.fixture(autouse=True)
def fresh(tmp_path, monkeypatch):
    monkeypatch.setenv("DINOCXR_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.delenv("DINOCXR_BACKEND", raising=False)
    monkeypatch.setenv("DINOCXR_FAKE_MODE", "right")
    _dispatch.reset()
    yield
    _dispatch.reset()


def x_in():
    return torch.arange(15.0).reshape(3, 5)


def plan(**kw):
    (row,) = _dispatch.plan([("fake_scale", CPU, CASE)], isolate=lambda *a: False, **kw)
    return row


def test_unverified_auto_takes_the_vendor_path():
    fakes.calls.update(cpp=0, torch=0)
    assert torch.equal(fakes.fake_scale(x_in()), x_in() * 2)
    assert fakes.calls == {"cpp": 0, "torch": 1}


def test_a_correct_faster_backend_is_chosen_after_verification():
    row = plan()
    assert row.chosen == "cpp" and row.speedup > 1 and row.max_err < 1e-6 and row.refused == {}
    fakes.calls.update(cpp=0, torch=0)
    assert torch.equal(fakes.fake_scale(x_in()), x_in() * 2)
    assert fakes.calls == {"cpp": 1, "torch": 0}
    # another batch of the same power-of-two bucket shares the verdict
    assert _dispatch.choose("fake_scale", "auto", CPU, fakes.IMPLEMENTED, lambda: dict(CASE, batch=4)).backend == "cpp"


@pytest.mark.parametrize("mode, why", [
    ("wrong", "max error"),
    ("raise", "raised RuntimeError: the fake kernel failed to compile"),
    ("nan", "non-finite"),
    ("slow", "slower than the vendor path"),
])
def test_a_bad_backend_is_refused_with_its_reason_and_the_numbers_stay_right(monkeypatch, caplog, mode, why):
    monkeypatch.setenv("DINOCXR_FAKE_MODE", mode)
    with caplog.at_level(logging.INFO, logger="dinocxr_fast.ops"):
        row = plan()
        plan(reverify=True)
    assert row.chosen == "torch" and why in row.refused["cpp"]
    assert sum("not chosen" in r.getMessage() for r in caplog.records) == 1  # the reason is logged once
    assert torch.equal(fakes.fake_scale(x_in()), x_in() * 2)
    assert "| fake_scale | 3x5 | float32 | torch |" in _dispatch.format_table([row])


@pytest.mark.parametrize("mode, why", [("hang", "timed out after 2 s"), ("exit", "crashed the verifying process")])
def test_a_backend_that_hangs_or_kills_its_process_is_refused_in_a_child(monkeypatch, mode, why):
    monkeypatch.setenv("DINOCXR_FAKE_MODE", mode)
    jobs = [("fake_scale", CASE, ["cpp"]), ("fake_scale", dict(CASE, n=6), ["cpp"])]
    monkeypatch.setattr(_verify, "CASE_TIMEOUT_S", 2.0)
    first, second = _verify.verify_isolated(jobs, CPU, timeout_s=2.0)
    assert [v["ok"] for v in first] == [False] and why in first[0]["reason"]
    assert why in second[0]["reason"]  # a fresh child took the second case, and failed it the same way
    assert torch.equal(fakes.fake_scale(x_in()), x_in() * 2)  # this process is unharmed


def test_the_child_process_passes_a_good_backend(monkeypatch):
    monkeypatch.setattr(_dispatch, "_isolate", lambda *a: True)
    (row,) = _dispatch.plan([("fake_scale", CPU, CASE)], isolate=lambda *a: True)
    assert row.chosen == "cpp", row.refused


def test_cached_verdicts_are_reused_without_verifying_again(monkeypatch):
    plan()
    path = _verdict_cache.cache_path(CPU)
    assert json.loads(path.read_text())["verdicts"]
    _dispatch.reset()  # a new process: only the file remains
    monkeypatch.setenv("DINOCXR_FAKE_MODE", "raise")  # would fail a new verification
    fakes.calls.update(cpp=0, torch=0)
    assert plan().chosen == "cpp"
    assert fakes.calls == {"cpp": 0, "torch": 0}  # nothing ran: the cache decided


@pytest.mark.parametrize("damage", ["corrupt", "other versions", "other format"])
def test_a_corrupt_or_stale_cache_is_ignored_and_rebuilt(monkeypatch, damage):
    plan()
    path = _verdict_cache.cache_path(CPU)
    data = json.loads(path.read_text())
    for verdict in data["verdicts"].values():
        verdict.update(ok=True, speedup=9.0)  # a stale file claims the custom backend is fine
    if damage == "corrupt":
        path.write_text(path.read_text()[:40])
    elif damage == "other versions":
        data["environment"]["torch"] = "0.0.1"
        path.write_text(json.dumps(data))
    else:
        data["format"] = 0
        path.write_text(json.dumps(data))
    _dispatch.reset()
    monkeypatch.setenv("DINOCXR_FAKE_MODE", "wrong")
    row = plan()
    assert row.chosen == "torch" and "max error" in row.refused["cpp"]
    rebuilt = json.loads(path.read_text())
    assert rebuilt["environment"] == _verdict_cache.environment(CPU)
    assert any(v["backend"] == "cpp" and not v["ok"] for v in rebuilt["verdicts"].values())
    assert torch.equal(fakes.fake_scale(x_in()), x_in() * 2)


def test_a_backend_raising_mid_run_is_demoted_and_the_call_recomputed(monkeypatch, caplog):
    assert plan().chosen == "cpp"
    monkeypatch.setenv("DINOCXR_FAKE_MODE", "raise")
    fakes.calls.update(cpp=0, torch=0)
    with caplog.at_level(logging.WARNING, logger="dinocxr_fast.ops"):
        assert torch.equal(fakes.fake_scale(x_in()), x_in() * 2)
        assert torch.equal(fakes.fake_scale(x_in()), x_in() * 2)
    assert fakes.calls == {"cpp": 1, "torch": 2}  # demoted after the first failure
    assert sum("demoted" in r.getMessage() for r in caplog.records) == 1
    assert ("fake_scale", "cpp") in _dispatch.demoted()
    with pytest.raises(RuntimeError, match="compile"):  # asked for by name, the error is the caller's
        fakes.fake_scale(x_in(), backend="cpp")


def test_forcing_a_backend_the_op_lacks_falls_through_to_auto_with_a_warning(monkeypatch):
    _dispatch.set_forced("triton")
    with pytest.warns(RuntimeWarning, match="fake_scale: backend 'triton'"):
        assert torch.equal(fakes.fake_scale(x_in()), x_in() * 2)
    _dispatch.set_forced("cpp")  # one the op has: taken without verification, as asked
    fakes.calls.update(cpp=0, torch=0)
    with _dispatch.recording() as calls:
        fakes.fake_scale(x_in())
    assert fakes.calls["cpp"] == 1
    monkeypatch.setenv("DINOCXR_FAKE_MODE", "slow")
    (row,) = _dispatch.plan(calls, isolate=lambda *a: False)
    assert row.chosen == "cpp (forced)" and "slower" in row.refused["cpp"]  # the table shows both
    monkeypatch.setenv("DINOCXR_FAKE_MODE", "right")
    monkeypatch.setenv("DINOCXR_BACKEND", "cuda")  # the environment variable forces the same way
    _dispatch.set_forced(None)
    with pytest.warns(RuntimeWarning, match="'cuda' was asked for but cannot run here"):
        fakes.fake_scale(x_in())
    with pytest.raises(ValueError, match="unknown backend"):
        _dispatch.set_forced("fastest")
    monkeypatch.delenv("DINOCXR_BACKEND")
    with pytest.warns(RuntimeWarning, match="no 'triton' backend"):  # on the call: also a warning, not a crash
        assert torch.equal(fakes.fake_scale(x_in(), backend="triton"), x_in() * 2)


# ---- the real ops through the same rule, on the CPU -----------------------------------------------
def test_the_real_ops_plan_a_model_and_keep_the_reference_numbers():
    from dinocxr_fast.models.vitaev2 import CONFIGS, ViTAEv2
    from dinocxr_fast.ops import dino_loss

    torch.manual_seed(0)
    model = ViTAEv2(CONFIGS["vitaev2_tiny"]).eval()
    x = torch.randn(2, 1, 32, 32)
    with torch.no_grad():
        want = model(x)
    with _dispatch.recording() as calls:
        with torch.no_grad():
            model(x)
        s, t = torch.randn(6, 64), torch.randn(4, 64)
        dino_loss(s, t, torch.zeros(64), student_temp=0.1, teacher_temp=0.04)
    ops = {op for op, _, _ in calls}
    assert {"attention", "window_attention", "pcm", "conv_bn_act", "dino_loss"} <= ops
    rows = _dispatch.plan(calls)
    assert all(r.chosen in ("torch", "cpp") for r in rows)
    refused_or_chosen = [r for r in rows if r.op in ("pcm", "dino_loss")]
    assert all(r.chosen == "cpp" or "cpp" in r.refused for r in refused_or_chosen)  # every cpp verdict stated
    with torch.no_grad():
        torch.testing.assert_close(model(x), want, rtol=1e-4, atol=1e-5)


def test_float64_dino_loss_on_cuda_falls_back_instead_of_raising(monkeypatch):
    dl = importlib.import_module("dinocxr_fast.ops.dino_loss")

    s, t = torch.randn(6, 8, dtype=torch.float64), torch.randn(4, 8, dtype=torch.float64)
    monkeypatch.setattr(_dispatch, "choose", lambda *a, **k: _dispatch.Choice("cuda", "auto"))
    assert dl._choose("auto", CPU, s, t, 2).backend == "torch"
    monkeypatch.setattr(_dispatch, "choose", lambda *a, **k: _dispatch.Choice("cuda", "explicit"))
    with pytest.raises(ValueError, match="float64"):
        dl._choose("cuda", CPU, s, t, 2)


def test_sync_batch_norm_is_never_bypassed_by_the_fused_path(monkeypatch):
    """Under DDP a SyncBatchNorm synchronises its statistics in its forward: the model must call it
    (the fused op would read its parameters and normalise per GPU)."""
    from dinocxr_fast.models.vitaev2 import CONFIGS, ViTAEv2
    from dinocxr_fast.models import layers

    torch.manual_seed(0)
    model = ViTAEv2(CONFIGS["vitaev2_tiny"]).train()
    ref = ViTAEv2(CONFIGS["vitaev2_tiny"]).train()
    ref.load_state_dict(model.state_dict())
    synced = torch.nn.SyncBatchNorm.convert_sync_batchnorm(model)
    seen = []
    monkeypatch.setattr(torch.nn.SyncBatchNorm, "forward",
                        lambda self, x, _f=torch.nn.SyncBatchNorm.forward: seen.append(1) or _f(self, x))
    real_pcm = layers.pcm
    monkeypatch.setattr(layers, "pcm", lambda *a, **k: pytest.fail("the fused PCM ran on SyncBatchNorm"))
    x = torch.randn(2, 1, 32, 32)
    got = synced(x)
    n_bn = sum(isinstance(m, torch.nn.SyncBatchNorm) for m in synced.modules())
    assert n_bn > 0 and len(seen) == n_bn
    monkeypatch.setattr(layers, "pcm", real_pcm)
    torch.testing.assert_close(got, ref(x), rtol=1e-4, atol=1e-5)
    for a, b in zip(synced.buffers(), ref.buffers()):
        torch.testing.assert_close(a, b)


# ---- the trainer's start-up plan ----------------------------------------------------------------------
def test_pretraining_plans_every_op_and_writes_the_table(tmp_path, capsys):
    from dinocxr_fast import train

    run = tmp_path / "run"
    args = ["--out", str(run), "--max-steps", "1", "--quiet", "--backend", "cuda",  # no op can run cuda here
            "--set", "data.synthetic_count=8", "--set", "data.synthetic_size=32", "--set", "data.view_size=32",
            "--set", "optim.batch_size=2", "--set", "model.out_dim=64", "--set", "model.head_hidden_dim=32",
            "--set", "model.head_bottleneck_dim=16", "--set", "data.num_workers=1", "--set", "train.knn_every=0"]
    with pytest.warns(RuntimeWarning, match="'cuda' was asked for but cannot run here"):
        assert train.main(args) == 0
    table = (run / "backends.md").read_text()
    for op in ("| dino_loss |", "| attention |", "| window_attention |", "| pcm |", "| conv_bn_act |"):
        assert op in table
    rows = json.loads((run / "backends.json").read_text())["rows"]
    assert all(r["chosen"] in ("torch", "cpp") for r in rows)
    # the start-up block names the backend of every op, with the table's place
    line = next(ln for ln in capsys.readouterr().err.splitlines() if ln.strip().startswith("backends "))
    for op in ("dino_loss", "attention", "window_attention", "pcm", "conv_bn_act"):
        assert f"{op} " in line
    assert "forced: cuda" in table and f"(table: {run / 'backends.md'})" in line


def test_a_backend_failing_in_its_backward_is_demoted_and_the_step_recomputed(tmp_path, monkeypatch, caplog):
    """The forward is gone when a backward kernel fails: the training loop demotes the backend
    (every op it serves) and recomputes the step on the vendor path; the run ends normally."""
    from dinocxr_fast import train
    from dinocxr_fast.ops import bn_act_cpu as bn_act

    failures = []

    def broken_backward(*args):
        failures.append(1)
        raise RuntimeError("illegal instruction in the fake backward kernel")

    monkeypatch.setattr(bn_act, "_bn_act_backward_op", broken_backward)
    run = tmp_path / "run"
    args = ["--out", str(run), "--max-steps", "3", "--quiet", "--backend", "cpp",
            "--set", "data.synthetic_count=8", "--set", "data.synthetic_size=32", "--set", "data.view_size=32",
            "--set", "optim.batch_size=2", "--set", "model.out_dim=64", "--set", "model.head_hidden_dim=32",
            "--set", "model.head_bottleneck_dim=16", "--set", "data.num_workers=1", "--set", "train.knn_every=0"]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # ops the cpp backend does not have fall through
        assert train.main(args) == 0
    assert failures  # the start-up verification sees it too, and refuses cpp: forced, it runs anyway
    assert {("conv_bn_act", "cpp"), ("pcm", "cpp")} <= set(_dispatch.demoted())
    said = [r.getMessage() for r in caplog.records if "the step recomputed" in r.getMessage()]
    assert len(said) == 1 and said[0].startswith("step 0: conv_bn_act/pcm: backend 'cpp' raised in its backward")
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in rows if "loss" in r]
    assert [r["step"] for r in steps][-1] == 3 and all(math.isfinite(r["loss"]) for r in steps)


def test_backward_of_names_the_backend_and_keeps_the_cause():
    with pytest.raises(_dispatch.BackendError) as info:
        with _dispatch.backward_of(("conv_bn_act", "pcm"), "cpp"):
            raise ValueError("bad launch")
    err = info.value
    assert isinstance(err, RuntimeError) and err.ops == ("conv_bn_act", "pcm") and err.backend == "cpp"
    assert isinstance(err.__cause__, ValueError) and "bad launch" in str(err)
    err.demote()
    assert set(_dispatch.demoted()) == {("conv_bn_act", "cpp"), ("pcm", "cpp")}


def test_a_bad_argument_is_not_reported_as_a_non_finite_loss():
    from dinocxr_fast.ops import dino_loss
    from dinocxr_fast.ops._checks import NonFiniteInputError

    s, t = torch.randn(6, 8), torch.randn(4, 8)
    with pytest.raises(NonFiniteInputError):
        dino_loss(s * float("nan"), t, torch.zeros(8), student_temp=0.1, teacher_temp=0.04)
    with pytest.raises(ValueError) as bad_shape:
        dino_loss(s, t[:, :4], torch.zeros(8), student_temp=0.1, teacher_temp=0.04)
    assert not isinstance(bad_shape.value, NonFiniteInputError)  # trainer/pretrain.py only turns the former into a stop


def test_a_failing_reference_refuses_every_candidate_instead_of_stopping_the_run(monkeypatch):
    def broken(case, device):
        raise RuntimeError("out of memory")

    monkeypatch.setattr(fakes, "SPEC", dataclasses.replace(fakes.SPEC, make_inputs=broken))
    row = plan()
    assert row.chosen == "torch" and "verification failed: RuntimeError: out of memory" in row.refused["cpp"]


def test_the_cache_folder_and_its_atomic_write(tmp_path, monkeypatch):
    monkeypatch.delenv("DINOCXR_CACHE_DIR")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert _verdict_cache.cache_dir() == tmp_path / "xdg" / "dinocxr_fast"
    monkeypatch.setenv("DINOCXR_CACHE_DIR", str(tmp_path / "mine"))
    path = _verdict_cache.save(CPU, {"k": {"ok": True}})
    assert path.parent == tmp_path / "mine" and [p.name for p in path.parent.iterdir()] == [path.name]
    assert _verdict_cache.load(CPU) == {"k": {"ok": True}}
