"""The README's walkthrough block runs as written (on the shared cxr-sample, CPU), each command
with a few options appended that only make it short; and the next steps that a pretraining
run's summary.md prints work as printed."""
from __future__ import annotations

import re
import shlex
from pathlib import Path

import pytest

from data_helpers import cxr_sample

from dinocxr_fast import evaluate, export, infer, train

REPO = Path(__file__).resolve().parents[1]
README_SAMPLE = "../shared/data/cxr-sample"

TINY_PRETRAIN = ["--max-steps", "2", "--quiet", "--set", "data.synthetic_count=16", "--set", "data.synthetic_size=64",
                 "--set", "data.view_size=64", "--set", "optim.batch_size=4", "--set", "model.out_dim=128",
                 "--set", "model.head_hidden_dim=32", "--set", "model.head_bottleneck_dim=16",
                 "--set", "data.num_workers=1", "--set", "train.knn_size=64"]
SHORT = {  # what each command gets appended: fewer steps and smaller images, nothing else
    ("train", "pretrain"): TINY_PRETRAIN,
    ("train", "linear"): ["--set", "data.image_size=64", "--set", "eval.bootstrap=20", "--set", "linear.epochs=5",
                          "--quiet"],
    ("train", "finetune"): ["--set", "data.image_size=64", "--set", "eval.bootstrap=20", "--max-steps", "2", "--quiet"],
    ("evaluate", None): ["--bootstrap", "20"],
    ("infer", None): ["--quiet"],
}
MAINS = {"train": train.main, "evaluate": evaluate.main, "export": export.main, "infer": infer.main}


def walkthrough_commands() -> list[list[str]]:
    text = (REPO / "README.md").read_text()
    block = re.search(r"<!-- walkthrough:[^>]*-->\s*```bash\n(.*?)```", text, re.S)
    assert block, "README.md lost its walkthrough block"
    return [shlex.split(line) for line in block.group(1).splitlines() if line.startswith("python -m dinocxr_fast.")]


def run_command(words: list[str], sample: Path) -> int:
    assert words[:2] == ["python", "-m"], words
    module = words[2].split(".")[1]
    argv = [w.replace(README_SAMPLE, str(sample)) for w in words[3:]]
    sub = argv[0] if module == "train" and argv and not argv[0].startswith("-") else ("pretrain" if module == "train" else None)
    extra = SHORT.get((module, sub), [])
    return MAINS[module](argv + extra)


def test_readme_walkthrough_runs_as_written(tmp_path, monkeypatch):
    sample = cxr_sample()
    monkeypatch.chdir(tmp_path)
    commands = walkthrough_commands()
    assert len(commands) >= 8
    for words in commands:
        assert run_command(words, sample) == 0, " ".join(words)
    assert (tmp_path / "runs/demo/teacher_backbone.safetensors").is_file()
    for run in ("demo-linear", "demo-finetune"):
        assert (tmp_path / "runs" / run / "classifier.pt").is_file()
        assert (tmp_path / "runs" / run / "report" / "report.md").is_file()
    assert (tmp_path / "runs/demo-finetune/eval-cxr-sample-val/report.md").is_file()
    assert list((tmp_path / "runs/demo-finetune/attention").glob("*_attention.png"))
    # the finetune summary's own next step (evaluate) names a split that exists
    summary = (tmp_path / "runs/demo-finetune/summary.md").read_text()
    step = re.search(r"`(python -m dinocxr_fast\.evaluate [^`]*)`", summary).group(1)
    assert run_command(shlex.split(step) + ["--out", "eval-from-summary"], sample) == 0


def summary_next_steps(run: Path) -> dict[str, list[str]]:
    text = (run / "summary.md").read_text().split("## Next", 1)[1]
    return {m.group(1): shlex.split(m.group(2)) for m in re.finditer(r"- ([^:]+): `(python -m [^`]*)`", text)}


def test_pretrain_summary_next_steps_work(tmp_path, monkeypatch):
    """'continue this run' resumes from the run's own config (no options repeated), 'export the
    teacher backbone' takes seconds and trains nothing."""
    monkeypatch.chdir(tmp_path)
    run = tmp_path / "run"
    assert train.main(["--out", str(run), *TINY_PRETRAIN, "--set", "train.knn_every=0"]) == 0
    steps = summary_next_steps(run)
    cont = steps["continue this run"]
    assert train.main(cont[3:] + ["--max-steps", "3", "--quiet"]) == 0
    assert "train.max_steps None -> 3" in (run / "resume-changes.log").read_text()
    assert "synthetic_count: 16" in (run / "config.yaml").read_text()  # the run's own config, kept
    before = sorted(p.name for p in run.glob("checkpoint-*.pt"))
    exp = next(v for k, v in steps.items() if k.startswith("export the teacher backbone"))
    assert train.main(exp[3:]) == 0
    assert (run / "teacher_backbone.safetensors").is_file()
    assert sorted(p.name for p in run.glob("checkpoint-*.pt")) == before  # no training happened


def test_resume_refuses_a_change_that_makes_another_run(tmp_path, capsys):
    run = tmp_path / "run"
    assert train.main(["--out", str(run), *TINY_PRETRAIN, "--set", "train.knn_every=0"]) == 0
    config = (run / "config.yaml").read_text()
    capsys.readouterr()
    assert train.main(["--out", str(run), "--resume", "auto", "--set", "optim.lr=0.1"]) == 2
    err = capsys.readouterr().err
    assert "optim.lr" in err and "different run" in err and len(err.strip().splitlines()) == 1
    assert (run / "config.yaml").read_text() == config


@pytest.mark.parametrize("case", ["missing data", "bad split"])
def test_failed_command_leaves_no_run_folder(tmp_path, case):
    out = tmp_path / "out"
    if case == "missing data":
        assert train.main(["--out", str(out), "--data", str(tmp_path / "nowhere"), "--quiet"]) == 1
    else:
        (tmp_path / "data" / "train").mkdir(parents=True)
        assert train.main(["linear", "--out", str(out), "--data", str(tmp_path / "data"), "--quiet"]) == 1
    assert not out.exists()
