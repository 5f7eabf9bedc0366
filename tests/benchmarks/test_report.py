"""benchmarks/report.py: the README's performance table comes from the committed results."""
from __future__ import annotations

import json
import subprocess
import sys

import pytest

from benchmarks import _harness as H
from benchmarks import report


def _record(**kw):
    r = dict(name="op", shape="B=2", backend="ours", peer="eager", median_ms=2.0, peer_median_ms=5.0, ratio=2.5,
             device="CPU test", torch_version="x", extra={})
    r.update(kw)
    return r


def test_readme_table_is_current():
    """CI fails when a result is committed without regenerating the README's table."""
    assert report.main(["--check"]) == 0


def test_render_rows_gpu_first_and_skips_details(tmp_path):
    (tmp_path / "cpu_2026-01-02_x.json").write_text(json.dumps([_record(), _record(peer="-", name="detail")]))
    (tmp_path / "gpu.json").write_text(json.dumps([_record(device="NVIDIA H100 80GB HBM3", date="2026-03-04",
                                                           commit="abc1234", benchmark="bench_x")]))
    (tmp_path / "trace.json").write_text(json.dumps({"not": "records"}))
    table = report.render(report.load_records(tmp_path))
    rows = table.splitlines()[2:]
    assert len(rows) == 2
    assert "NVIDIA H100" in rows[0] and "2026-03-04" in rows[0] and "abc1234" in rows[0]
    assert "2026-01-02" in rows[1]  # the date taken from the file name when the record has none
    assert "detail" not in table and "**2.50x**" in table


def test_bad_record_is_named(tmp_path):
    (tmp_path / "bad.json").write_text(json.dumps([{"name": "x"}]))
    with pytest.raises(ValueError, match="bad.json"):
        report.load_records(tmp_path)


def test_splice_and_check(tmp_path):
    results = tmp_path / "results"
    results.mkdir()
    (results / "r.json").write_text(json.dumps([_record()]))
    readme = tmp_path / "README.md"
    readme.write_text(f"intro\n{report.BEGIN}\nold\n{report.END}\nafter\n")
    args = ["--results", str(results), "--readme", str(readme)]
    assert report.main(["--check", *args]) == 1
    assert report.main(args) == 0
    text = readme.read_text()
    assert text.startswith("intro\n") and text.endswith("after\n") and "old" not in text and "**2.50x**" in text
    assert report.main(["--check", *args]) == 0
    readme.write_text("no markers\n")
    with pytest.raises(ValueError, match="markers"):
        report.main(args)


def test_write_json_stamps_commit_date_command(tmp_path):
    rec = H.make_record("op", "B=2", "ours", "eager", 1.0, 2.0, "cpu")
    out = tmp_path / "r.json"
    H.write_json([rec], out, allow_busy=True)  # the test machine's load is not the point here
    (row,) = json.loads(out.read_text())
    assert row["ratio"] == 2.0 and row["commit"] and len(row["date"]) == 10 and row["command"]


def test_busy_and_unrecorded_rows_are_marked_or_left_out(tmp_path):
    load = {"other_cores": 0.05, "busy": False}
    (tmp_path / "r.json").write_text(json.dumps([
        _record(name="quiet_op", load=load, busy=False, extra={"frac_stream_bw": 0.42}),
        _record(name="busy_op", load={"other_cores": 1.3, "busy": True}, busy=True),
        _record(name="old_op"),
    ]))
    records = report.load_records(tmp_path)
    rows = {line.split(" | ")[1].split()[0]: line for line in report.render(records).splitlines()[2:]}
    assert "quiet (0.05 cores)" in rows["quiet_op"] and "0.42 of STREAM bw" in rows["quiet_op"]
    assert "BUSY (1.30 cores)" in rows["busy_op"] and "not recorded" in rows["old_op"]
    quiet = report.render(records, quiet_only=True)
    assert "quiet_op" in quiet and "busy_op" not in quiet and "old_op" not in quiet


def test_report_cli_runs():
    proc = subprocess.run([sys.executable, "-m", "benchmarks.report", "--print"], capture_output=True, text=True,
                          check=True, cwd=report.ROOT)
    assert proc.stdout.startswith("| benchmark |")
