"""train.max_minutes is the wall time of the whole command (runtime/budget.py): the loop stops when
the next step, the epoch-end work it brings and everything after the loop would not fit. Driven by
a fake clock, so nothing here depends on the machine's speed or load; one short real pretraining
run checks the whole chain within a generous margin."""
from __future__ import annotations

import time

import pytest
import torch

from dinocxr_fast import train
from dinocxr_fast.runtime.budget import EXIT_S, Budget
from dinocxr_fast.trainer.loop import TrainingJob


class Clock:
    def __init__(self, t: float = 1000.0):
        self.t = t

    def __call__(self) -> float:
        return self.t


def test_budget_estimates_from_measured_durations():
    clock = Clock()
    b = Budget(clock(), 1.0, clock=clock)
    assert b.fits() and b.step_s() == 0.0
    b.step_took(9.0)  # the first step's one-off costs count only until other steps are measured
    assert b.step_s() == 9.0
    for s in (1.0, 1.2, 0.8, 5.0):
        b.step_took(s)
    assert b.step_s() == pytest.approx(1.1)  # median of the steps after the first: one slow step does not dominate
    b.checkpoint_took(0.5)
    b.checkpoint_took(0.2)
    assert b.end_s(3.0) == pytest.approx(3.0 + 0.5 + EXIT_S)
    clock.t += 60 - (1.1 + 3.0 + 0.5 + EXIT_S)  # exactly one step and the end left
    assert b.fits(end_reserve=3.0) and not b.fits(end_reserve=3.0, extra=0.01) and not b.fits(steps=2, end_reserve=3.0)
    assert b.steps_that_fit(3.0) == 1
    assert Budget(clock(), None, clock=clock).fits(steps=10 ** 9)


class _Loader:
    backend, num_skipped = "fake", 0

    def __init__(self, n: int):
        self.n = n

    def __len__(self):
        return self.n

    def __iter__(self):
        return iter(range(self.n))

    def set_epoch(self, epoch):
        pass

    def state_dict(self):
        return {}

    def close(self):
        pass


class FakeJob(TrainingJob):
    """Steps, epoch-end passes and the final work that only advance a fake clock."""
    TITLE = "fake run"

    def __init__(self, run_dir, clock: Clock, *, minutes, step_s=1.0, epoch_end_s=5.0, end_s=3.0, steps_per_epoch=10,
                 whole_epochs=False, start_cost=2.0, show_progress=False):
        cfg = {"train": {"device": "cpu", "precision": "fp32", "seed": 0, "epochs": 100, "max_steps": None,
                         "max_minutes": minutes, "log_every": 1000, "ckpt_every": 1000, "keep_last": 1}}
        super().__init__(cfg, run_dir, show_progress=show_progress)
        self.clock, self.t_start = clock, clock()
        clock.t += start_cost  # set-up: imports, data, models, planning
        self.fake = {"step": step_s, "epoch_end": epoch_end_s, "end": end_s}
        self.whole_epochs = whole_epochs
        self.loader, self.steps_per_epoch = _Loader(steps_per_epoch), steps_per_epoch
        self.weight = torch.nn.Parameter(torch.zeros(1))
        self.epoch_ends, self.finished_at = [], None

    def train_step(self, batch):
        self.clock.t += self.fake["step"]
        self.step += 1
        return {"loss": torch.tensor(1.0)}

    def batch_images(self, batch):
        return 1

    def model_state(self):
        return {}

    def weights(self):
        return [self.weight]

    def on_epoch_end(self, epoch, progress):
        self.clock.t += self.fake["epoch_end"]
        self.epoch_ends.append(self.step)

    def epoch_end_reserve(self, epoch):
        return self.fake["epoch_end"]

    def end_reserve(self):
        return self.fake["end"]

    def whole_epochs_only(self):
        return self.whole_epochs and bool(self.epoch_ends)

    def on_finish(self):
        self.clock.t += self.fake["end"]
        self.finished_at = self.clock()


def run_fake(tmp_path, **kw) -> FakeJob:
    job = FakeJob(tmp_path / "run", Clock(), **kw)
    try:
        job.run()
    finally:
        job.close()
    return job


@pytest.mark.parametrize("minutes", [0.5, 1.0, 1.37])
def test_the_run_ends_within_its_budget_and_uses_it(tmp_path, minutes):
    job = run_fake(tmp_path, minutes=minutes)
    deadline = job.t_start + minutes * 60
    assert job.stop.kind == "max_minutes"
    assert job.finished_at + EXIT_S <= deadline  # everything, the exit allowance included, inside the budget
    # and not stopped early: one more step (with its epoch-end pass, when it would end an epoch) would not fit
    next_ends_epoch = (job.step + 1) % job.steps_per_epoch == 0
    assert job.finished_at + EXIT_S + 1.0 + (5.0 if next_ends_epoch else 0.0) > deadline
    # a step that ended an epoch had its epoch-end pass
    assert job.epoch_ends == [s for s in range(10, job.step + 1, 10)]


def test_epoch_granular_jobs_stop_at_an_epoch_end(tmp_path):
    """Fine-tuning keeps the best validated epoch: it starts no epoch it cannot finish and validate."""
    job = run_fake(tmp_path, minutes=1.0, whole_epochs=True)
    assert job.stop.kind == "max_minutes" and job.step % 10 == 0 and job.epoch_ends[-1] == job.step
    assert job.finished_at + EXIT_S <= job.t_start + 60
    assert job.finished_at + EXIT_S + 10 * 1.0 + 5.0 > job.t_start + 60  # another epoch would not have fit


def test_a_budget_spent_by_the_set_up_runs_no_step(tmp_path):
    job = run_fake(tmp_path, minutes=0.05, start_cost=10.0)
    assert job.stop.kind == "max_minutes" and job.step == 0 and job.finished_at is not None


def test_a_short_real_run_stops_within_its_budget(tmp_path):
    """The whole command in this process (planning, steps, kNN passes, checkpoints, summary):
    train.max_minutes=0.25 (15 s) within a generous margin; the test's own clock, not the job's."""
    minutes = 0.25
    t0 = time.monotonic()
    assert train.main(["--out", str(tmp_path / "run"), "--quiet", "--set", f"train.max_minutes={minutes}",
                       "--set", "data.synthetic_count=32", "--set", "data.synthetic_size=64",
                       "--set", "data.view_size=32", "--set", "optim.batch_size=8", "--set", "model.out_dim=128",
                       "--set", "model.head_hidden_dim=32", "--set", "model.head_bottleneck_dim=16",
                       "--set", "data.num_workers=1", "--set", "train.knn_data=auto", "--set", "train.knn_size=32",
                       "--set", "train.knn_every=2"]) == 0
    elapsed = time.monotonic() - t0
    summary = (tmp_path / "run" / "summary.md").read_text()
    assert "max_minutes" in summary
    assert minutes * 60 * 0.5 <= elapsed <= minutes * 60 + 5.0, f"{elapsed:.1f} s for a {minutes * 60:.0f} s budget"


def test_a_run_that_ends_on_its_last_step_is_done_not_timed_out(tmp_path):
    """The last step of the schedule leaves no room for another one: the run is done all the same."""
    job = FakeJob(tmp_path / "run", Clock(), minutes=1.0, epoch_end_s=0.0, end_s=0.0)
    job.epochs = 4  # 40 steps of 1 s: the 40th ends when no 41st would fit
    job.fake["step"] = (60 - 2.0 - EXIT_S - 0.5) / 40
    try:
        job.run()
    finally:
        job.close()
    assert job.step == 40 and job.stop.kind == "done"


def test_progress_from_the_first_step(tmp_path, capsys):
    """log_every=1000: the first step still shows at once (then every log_every steps)."""
    run_fake(tmp_path, minutes=0.2, show_progress=True)
    err = capsys.readouterr().err
    assert "== fake run ==" in err and "step 1/1000 epoch=0.10 loss=1.0000" in err
