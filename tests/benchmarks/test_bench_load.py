"""benchmarks/_load.py and the busy-machine guard of benchmarks/_harness.py, on fake /proc readings."""
from __future__ import annotations

import json

import pytest

from benchmarks import _bandwidth, _load
from benchmarks import _harness as H

# /proc/stat: cpu user nice system idle iowait irq softirq steal guest guest_nice
STAT = "cpu  {user} 10 {system} 9000 50 5 5 {steal} 7 0\ncpu0 1 2 3 4 5 6 7 8 0 0\nintr 1\n"
# /proc/self/stat: the command name holds a space and a ')' to check the parsing
SELF = "4242 (python (x) y) R 1 2 3 4 5 6 7 8 9 10 {utime} {stime} {cutime} {cstime} 20 0 1 0\n"


def fake_proc(stat: dict, self_stat: dict, loadavg: str = "0.20 0.30 0.40 1/100 4242"):
    files = {"stat": STAT.format(**stat), "self/stat": SELF.format(**self_stat), "loadavg": loadavg}
    return files.__getitem__


def test_busy_ticks_counts_non_idle_including_steal():
    text = STAT.format(user=100, system=40, steal=3)
    assert _load.busy_ticks(text) == 100 + 10 + 40 + 5 + 5 + 3  # idle 9000 and iowait 50 left out
    with pytest.raises(ValueError, match="aggregate cpu"):
        _load.busy_ticks("intr 1\n")


def test_own_ticks_reads_fields_14_to_17_after_the_command_name():
    assert _load.own_ticks(SELF.format(utime=11, stime=22, cutime=33, cstime=44)) == 110


def _snap(busy_user, own_utime, wall, loadavg="0.20 0.30 0.40 1/100 4242", processes=None):
    read = fake_proc({"user": busy_user, "system": 0, "steal": 0}, {"utime": own_utime, "stime": 0, "cutime": 0,
                                                                     "cstime": 0}, loadavg)
    return _load.snapshot(read, clock=lambda: wall, processes=lambda: processes or {}, pid=4242)


def _proc(pid, ppid, utime):
    return f"{pid} (worker) S {ppid} 1 1 0 -1 0 0 0 0 0 {utime} 0 0 0 20 0 1 0\n"


def test_live_descendants_count_as_own():
    """Data loader or compile workers still alive at the end are the benchmark's, not other load."""
    stats = {4242: _proc(4242, 1, 0), 5000: _proc(5000, 4242, 300), 5001: _proc(5001, 5000, 200),
             6000: _proc(6000, 1, 999)}  # 6000 is someone else's
    assert _load.descendant_ticks(stats, 4242) == 500
    start = _snap(0, 0, 0.0)
    end = _snap(1000, 400, 10.0, processes={k: v for k, v in stats.items() if k != 4242})
    load = _load.summarize(start, end, ticks_per_s=100)  # 1000 busy - 400 own - 500 children = 1 s
    assert load["other_cpu_s"] == 1.0 and load["busy"] is False


def test_summary_subtracts_own_cpu_time():
    # 10 s wall; the machine did 2000 busy ticks (20 s on 100 Hz), 1900 of them ours: 1 s of others
    start, end = _snap(1000, 0, 100.0), _snap(3000, 1900, 110.0, "1.50 0.9 0.5 2/100 4242")
    load = _load.summarize(start, end, ticks_per_s=100)
    assert load["other_cpu_s"] == 1.0 and load["other_cores"] == pytest.approx(0.1)
    assert load["busy"] is False and load["loadavg_start"] == [0.2, 0.3, 0.4] and load["loadavg_end"][0] == 1.5


def test_summary_busy_above_half_a_core():
    start, end = _snap(0, 0, 0.0), _snap(2000, 1000, 10.0)  # others: 10 s over 10 s = 1 core
    load = _load.summarize(start, end, ticks_per_s=100)
    assert load["other_cores"] == pytest.approx(1.0) and load["busy"] is True
    assert "BUSY" in _load.describe(load)


def test_unreadable_proc_counts_as_busy():
    def missing(name):
        raise OSError(name)

    assert _load.snapshot(missing, processes=dict) is None
    load = _load.summarize(None, None)
    assert load["busy"] is True and "unknown" in _load.describe(load)


def test_monitor_on_this_machine_gives_a_record():
    load = _load.LoadMonitor().summary()
    assert {"other_cores", "busy"} <= load.keys()


QUIET = {"loadavg_start": [0.1, 0, 0], "loadavg_end": [0.2, 0, 0], "wall_s": 5.0, "other_cpu_s": 0.1,
         "other_cores": 0.02, "busy_limit_cores": 0.5, "busy": False}
BUSY = {**QUIET, "other_cpu_s": 6.0, "other_cores": 1.2, "busy": True}


def test_write_json_refuses_a_busy_run(tmp_path, capsys):
    rec = H.make_record("op", "B=2", "ours", "eager", 1.0, 2.0, "cpu")
    out = tmp_path / "r.json"
    with pytest.raises(H.BusyMachine, match="--allow-busy"):
        H.write_json([rec], out, allow_busy=False, load=BUSY)
    assert not out.exists()
    H.write_json([rec], out, allow_busy=True, load=BUSY)
    (row,) = json.loads(out.read_text())
    assert row["busy"] is True and row["load"]["other_cores"] == 1.2
    H.write_json([rec], out, allow_busy=False, load=QUIET)
    (row,) = json.loads(out.read_text())
    assert row["busy"] is False and row["load"]["loadavg_start"] == [0.1, 0, 0]
    assert "quiet" in capsys.readouterr().out


def test_allow_busy_flag_reaches_write_json(tmp_path):
    args = H.base_parser("x").parse_args(["--allow-busy", "--json", str(tmp_path / "r.json")])
    assert args.allow_busy
    H.write_json([H.make_record("op", "B=2", "ours", "eager", 1.0, 2.0, "cpu")], args.json, load=BUSY)
    assert json.loads((tmp_path / "r.json").read_text())[0]["busy"] is True
    H.base_parser("x").parse_args([])  # resets the flag for the tests after this one
    with pytest.raises(H.BusyMachine):
        H.write_json([], tmp_path / "s.json", load=BUSY)


def test_bandwidth_fraction_and_small_probe():
    probe = _bandwidth.stream(array_bytes=4 * 2**20, repeats=2)
    assert probe["copy_GB/s"] > 0 and probe["triad_GB/s"] > 0 and probe["best_GB/s"] >= probe["copy_GB/s"]
    frac = _bandwidth.fraction(10**9, 100.0, {"best_GB/s": 20.0})  # 1 GB in 0.1 s = 10 GB/s
    assert frac == {"GB/s": 10.0, "frac_stream_bw": 0.5}
    assert "triad" in _bandwidth.describe(probe)


def test_remeasure_script_accounts_for_every_committed_cpu_result():
    """scripts/remeasure_cpu.sh re-runs or names as not covered each committed cpu_* result."""
    import re
    import subprocess

    from benchmarks import report

    listing = subprocess.run(["bash", str(report.ROOT / "scripts" / "remeasure_cpu.sh"), "--list"],
                             capture_output=True, text=True, check=True).stdout
    covered = set(re.findall(r"^covers: (\S+)", listing, re.M))
    not_covered = set(re.search(r"^not covered: (.*)$", listing, re.M).group(1).split())
    assert "estimated total" in listing
    for path in (report.ROOT / "benchmarks" / "results").glob("cpu_*.json"):
        name = re.sub(r"^cpu_\d{4}-\d{2}-\d{2}_", "", path.stem)
        name = re.sub(r"_seed\d+$", "", name)
        assert name in covered | not_covered, f"{path.name} is neither re-measured nor listed as not covered"
