"""rnnlab/phases.py: each second of a stage charged to one phase, written where asked."""

import json
import time

import pytest

from rnnlab import phases
from rnnlab.errors import UserError, run_main


def test_time_goes_to_the_innermost_open_phase(monkeypatch):
    clock = iter([0.0, 1.0, 3.0, 6.0, 10.0, 15.0, 21.0])
    monkeypatch.setattr(phases.time, "perf_counter", lambda: next(clock))
    monkeypatch.setattr(phases, "process_age", lambda: 0.5)
    phases.begin()                               # t=0
    with phases.phase("training"):               # other 0..1
        with phases.phase("measurement"):        # training 1..3
            pass                                 # measurement 3..6
    # training 6..10, then other from 10
    with phases.phase("tracking"):               # other 10..15
        pass                                     # tracking 15..21
    assert dict(phases._spent) == {"startup": 0.5, "other": 1.0 + 5.0, "training": 2.0 + 4.0,
                                   "measurement": 3.0, "tracking": 6.0}


def test_a_stage_appends_its_phases_only_when_asked(tmp_path, monkeypatch):
    target = tmp_path / "profile.jsonl"
    monkeypatch.delenv(phases.PROFILE_ENV, raising=False)
    monkeypatch.setenv("DVC_STAGE", "train@rnn")

    def main():
        with phases.phase("training"):
            time.sleep(0.02)

    run_main(main)
    assert not target.exists()
    monkeypatch.setenv(phases.PROFILE_ENV, str(target))
    run_main(main)
    run_main(main)
    lines = [json.loads(line) for line in target.read_text().splitlines()]
    assert [line["stage"] for line in lines] == ["train@rnn", "train@rnn"]
    for line in lines:
        assert set(line["seconds"]) == set(phases.PHASES)
        assert line["seconds"]["training"] >= 0.02
        assert line["seconds"]["startup"] > 0  # this process started before the test
        assert line["ended"] - line["started"] == pytest.approx(sum(line["seconds"].values()), abs=1e-2)


def test_a_failed_stage_records_nothing(tmp_path, monkeypatch):
    target = tmp_path / "profile.jsonl"
    monkeypatch.setenv(phases.PROFILE_ENV, str(target))

    def main():
        raise UserError("bad")

    with pytest.raises(SystemExit):
        run_main(main)
    assert not target.exists()


def test_the_profile_table_adds_dvcs_gaps_and_the_ratio():
    from bench.run_profile import markdown

    seconds = dict.fromkeys(phases.PHASES, 0.0)
    rows = [{"stage": "train@rnn", **seconds, "training": 10.0, "startup": 2.0, "process": 12.0, "dvc": 1.5},
            {"stage": "evaluate@rnn", **seconds, "evaluation": 3.0, "tracking": 4.0, "process": 7.0, "dvc": 0.5}]
    text = markdown({"machine": {"cpu": "CPU", "kind": "cpu-x"}, "date": "d", "command": "c",
                     "rows": rows, "tail_dvc": 1.0, "wall": 22.0, "sum_train_seconds": 8.8,
                     "best_test_ppl": {"variant": "rnn", "test_ppl": 4.4}})
    total = text.splitlines()[[line.startswith("| **all**") for line in text.splitlines()].index(True)]
    assert total.split("|")[1:-1][-3:] == [" **19.0** ", " **3.0** ", " **22.0** "]
    assert "**2.50x** that" in text and "4.400 (rnn)" in text
