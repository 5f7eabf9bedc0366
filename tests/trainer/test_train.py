"""The pretraining job end to end on the CPU: default run, exact resume, signals, NaN guard,
config errors, DDP with gloo, the kNN monitor."""
from __future__ import annotations

import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from data_helpers import cxr_sample

from dinocxr_fast import train
from run_helpers import FAST, losses, read_metrics
from dinocxr_fast.runtime import checkpoint as ckpt

REPO = Path(__file__).resolve().parents[2]

# A small, fast configuration of the tiny preset.
def test_default_run_writes_everything(tmp_path):
    run = tmp_path / "run"
    assert train.main(["pretrain", "--out", str(run), "--max-steps", "4", "--save-backbone", *FAST]) == 0
    records = read_metrics(run)
    assert [r["step"] for r in records] == [1, 2, 3, 4]
    keys = {"step", "epoch", "loss", "lr", "weight_decay", "momentum", "teacher_temp", "images_per_s",
            "data_wait_frac", "peak_mem_mb", "grad_norm"}
    assert keys <= set(records[0])
    assert all(r["loss"] > 0 and r["images_per_s"] > 0 for r in records)
    assert (run / "config.yaml").is_file() and (run / "summary.md").is_file()
    assert list((run / "tensorboard").glob("events.out.tfevents.*"))
    assert (run / "teacher_backbone.safetensors").is_file()
    assert [p.name for p in ckpt.list_step_checkpoints(run)] == ["checkpoint-00000003.pt", "checkpoint-00000004.pt"]
    state = ckpt.load(run / "checkpoint-00000004.pt")  # weights_only=True
    assert state["step"] == 4 and state["data"]["step"] == 4
    assert set(state) >= {"student", "teacher", "optimizer", "scaler", "dino_loss", "rng", "config"}


def test_resume_reproduces_the_uninterrupted_run(tmp_path):
    straight, split = tmp_path / "straight", tmp_path / "split"
    # max_steps cuts the runs here, so the schedules must span all epochs (not fitted to each cut)
    nofit = ["--set", "train.fit_schedules=false"]
    assert train.main(["--out", str(straight), "--max-steps", "9", *FAST, *nofit]) == 0
    assert train.main(["--out", str(split), "--max-steps", "4", *FAST, *nofit]) == 0
    assert train.main(["--out", str(split), "--max-steps", "9", "--resume", "auto", *FAST, *nofit]) == 0
    a, b = losses(straight), losses(split)
    assert sorted(b) == list(range(1, 10))
    assert a == b  # bit-identical, across an epoch boundary (6 steps per epoch)
    sa = ckpt.load(straight / "checkpoint-00000009.pt")["student"]
    sb = ckpt.load(split / "checkpoint-00000009.pt")["student"]
    assert all(torch.equal(sa[k], sb[k]) for k in sa)


def test_keep_last_prunes_old_checkpoints(tmp_path):
    run = tmp_path / "run"
    assert train.main(["--out", str(run), *FAST, "--set", "train.ckpt_every=1", "--set", "train.keep_last=2"]) == 0
    assert [p.name for p in ckpt.list_step_checkpoints(run)] == ["checkpoint-00000011.pt", "checkpoint-00000012.pt"]
    assert (run / ckpt.FINAL_NAME).is_file()
    assert ckpt.load(run / ckpt.FINAL_NAME)["step"] == 12


def test_bad_config_key_is_named(capsys):
    assert train.main(["--set", "optim.lrr=1", "--quiet"]) == 2
    assert "optim.lrr" in capsys.readouterr().err
    assert train.main(["--preset", "no_such_preset"]) == 2
    assert "no_such_preset" in capsys.readouterr().err


def test_missing_data_path_is_a_clear_error(tmp_path, capsys):
    missing = tmp_path / "nowhere"
    assert train.main(["--out", str(tmp_path / "run"), "--data", str(missing), *FAST]) == 1
    err = capsys.readouterr().err
    assert "error:" in err and str(missing) in err


def test_loss_checked_every_n_steps_still_catches_every_step(tmp_path, monkeypatch, capsys):
    """train.loss_check_every=4 syncs once per 4 steps; a non-finite loss at a step in between is
    reported at the next check, naming the steps (the weights here stay finite: only the loss value
    is poisoned, so the checkpoint at the check is the real state)."""
    from dinocxr_fast.dino import DINOLoss

    original = DINOLoss.forward
    calls = {"n": 0}

    def poisoned(self, *args, **kwargs):
        loss = original(self, *args, **kwargs)
        calls["n"] += 1
        if calls["n"] == 2:  # step 1: the value only (a detached NaN adds nothing to the gradient)
            loss = loss + torch.tensor(float("nan")).detach()
        return loss

    monkeypatch.setattr(DINOLoss, "forward", poisoned)
    run = tmp_path / "run"
    assert train.main(["--out", str(run), *FAST, "--set", "train.ckpt_every=100",
                       "--set", "train.loss_check_every=4"]) == 1
    err = capsys.readouterr().err
    assert "non-finite loss at step 4" in err and "one of steps 1..3" in err


def test_non_finite_loss_stops_after_saving_last_good_state(tmp_path, monkeypatch, capsys):
    from dinocxr_fast.models import MultiCropWrapper

    original = MultiCropWrapper.forward
    calls = {"n": 0}

    def poisoned(self, crops):
        out = original(self, crops)
        if self.training and torch.is_grad_enabled():
            calls["n"] += 1
            if calls["n"] == 3:  # the student's forward at step 3
                out = out * float("nan")
        return out

    monkeypatch.setattr(MultiCropWrapper, "forward", poisoned)
    run = tmp_path / "run"
    assert train.main(["--out", str(run), *FAST, "--set", "train.ckpt_every=100"]) == 1
    err = capsys.readouterr().err
    assert "non-finite loss at step 2" in err and "student" in err
    good = ckpt.load(run / "checkpoint-00000002.pt")
    assert all(torch.isfinite(v).all() for v in good["student"].values() if v.is_floating_point())
    assert (run / "nonfinite-step00000002.pt").is_file()


def test_unwritable_checkpoint_keeps_previous(tmp_path, monkeypatch):
    import errno

    run = tmp_path / "run"
    assert train.main(["--out", str(run), "--max-steps", "3", *FAST]) == 0
    before = (run / "checkpoint-00000003.pt").read_bytes()

    def disk_full(*_a, **_k):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(torch, "save", disk_full)
    assert train.main(["--out", str(run), "--max-steps", "6", "--resume", "auto", *FAST]) == 1
    assert (run / "checkpoint-00000003.pt").read_bytes() == before
    assert not list(run.glob(".*.tmp-*"))


def _env() -> dict:
    env = dict(os.environ)
    env["PYTHONPATH"] = str(REPO) + os.pathsep + env.get("PYTHONPATH", "")
    return env


def test_sigterm_saves_a_checkpoint_and_exits_cleanly(tmp_path):
    run = tmp_path / "run"
    cmd = [sys.executable, "-m", "dinocxr_fast.train", "--out", str(run), *FAST, "--set", "train.epochs=50",
           "--set", "train.ckpt_every=1000"]
    proc = subprocess.Popen(cmd, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        if (run / "metrics.jsonl").is_file() and len(read_metrics(run)) >= 2:
            break
        if proc.poll() is not None:
            pytest.fail(f"trainer exited early: {proc.communicate()}")
        time.sleep(0.2)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 0, err
    assert "stopped by SIGTERM" in err
    saved = ckpt.list_step_checkpoints(run)
    assert saved, err
    step = ckpt.load(saved[-1])["step"]
    assert step >= 2 and step == max(losses(run))


def test_two_process_gloo_ddp_agrees_on_weights(tmp_path):
    run = tmp_path / "ddp"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", "29517",
           "-m", "dinocxr_fast.train", "--out", str(run), "--max-steps", "3", *FAST]
    result = subprocess.run(cmd, env=_env(), capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    state = ckpt.load(run / "checkpoint-00000003.pt")
    assert state["data"]["num_shards"] == 2
    # every rank compared its weights with rank 0's before exiting (see PretrainJob.check_replicas)
    assert "replicas agree" in result.stderr


def test_knn_monitor_on_cxr_sample(tmp_path):
    sample = cxr_sample()
    run = tmp_path / "run"
    assert train.main(["--out", str(run), "--max-steps", "6", "--knn-data", str(sample), *FAST,
                       "--set", "train.knn_size=64", "--set", "train.epochs=1", "--set", "optim.warmup_epochs=0",
                       "--set", "train.knn_every=1"]) == 0
    knn = [r for r in read_metrics(run) if "knn_acc" in r]
    # a baseline before the first step and one at the end of the (single) epoch
    assert [r["step"] for r in knn] == [0, 6] and all(0.0 <= r["knn_acc"] <= 1.0 for r in knn)


def test_default_knn_monitor_and_the_learned_verdict_in_the_summary(tmp_path):
    """tiny_cpu's kNN monitor (train.knn_data: auto): held-out subtle phantoms scored before the first
    step and at the end; summary.md gives both, the noise margin and the verdict with its reasons."""
    run = tmp_path / "run"
    assert train.main(["--out", str(run), "--max-steps", "4", *FAST, "--set", "train.knn_data=auto",
                       "--set", "train.knn_every=1", "--set", "train.knn_size=32"]) == 0
    knn = [r for r in read_metrics(run) if "knn_acc" in r]
    assert [r["step"] for r in knn] == [0, 4]
    summary = (run / "summary.md").read_text()
    assert "## Did it learn?" in summary
    assert "kNN accuracy on held-out subtle phantoms (256 labelled, 256 scored)" in summary and "noise margin" in summary
    verdict = next(line for line in summary.splitlines() if line.startswith("- learned: "))
    # four steps learn nothing: the verdict is no, and says why
    assert verdict.startswith("- learned: no (") and "kNN accuracy changed by" in verdict


def test_sinkhorn_centering_and_koleo_train(tmp_path):
    """DINOv2's options run through the job: finite losses, the KoLeo term in the loss."""
    run = tmp_path / "run"
    argv = ["pretrain", "--out", str(run), *FAST, "--set", "dino.centering=sinkhorn",
            "--set", "dino.koleo_weight=0.1", "--set", "data.loader=torch", "--set", "train.max_steps=4"]
    assert train.main(argv) == 0
    got = losses(run)
    assert got and all(math.isfinite(v) for v in got.values())
