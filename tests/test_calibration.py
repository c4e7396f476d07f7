"""Automatic choices by measurement (modgen.calibration) and the machine line every figure
carries (modgen.machine)."""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
import time

import pytest

from modgen import calibration, machine


def test_decide_keeps_the_baseline_unless_beaten_by_the_margin():
    assert calibration.decide({"torch": 1.0, "cpp": 0.5}, "torch") == "cpp"
    assert calibration.decide({"torch": 1.0, "cpp": 0.98}, "torch") == "torch"  # 2% < 3%
    assert calibration.decide({"torch": 1.0, "cpp": 1.5, "x": 0.9}, "torch") == "x"
    assert calibration.decide({"cpp": 0.5, "x": 0.4}, "torch") == "x"  # no baseline ran
    with pytest.raises(ValueError, match="no candidate could run"):
        calibration.decide({}, "torch")


def test_measure_runs_each_candidate_and_leaves_out_those_that_raise(caplog):
    calls = {"a": 0, "b": 0}

    def count(name):
        def fn():
            calls[name] += 1

        return fn

    def broken():
        raise RuntimeError("no such instruction")

    with caplog.at_level(logging.INFO):
        timings = calibration.measure({"a": count("a"), "b": count("b"), "c": broken}, repeats=4)
    assert set(timings) == {"a", "b"} and all(t >= 0 for t in timings.values())
    assert calls == {"a": 5, "b": 5}  # one warm-up and four timed calls each
    assert "c cannot run here: no such instruction" in caplog.text


def test_choose_caches_per_shape_and_version(monkeypatch, tmp_path, caplog):
    monkeypatch.setenv("MODGEN_CACHE", str(tmp_path))
    measured = []

    def fake_measure(candidates, repeats=5):
        measured.append(sorted(candidates))
        return {"torch": 2e-3, "fast": 1e-3}

    monkeypatch.setattr(calibration, "measure", fake_measure)
    runs = {"torch": lambda: None, "fast": lambda: None}
    with caplog.at_level(logging.INFO):
        first = calibration.choose("topic", {"d": 64}, runs, "torch", version="v1")
    assert first.name == "fast" and not first.cached
    assert "calibration: topic [d=64]: torch 2 ms, fast 1 ms -> fast" in caplog.text
    again = calibration.choose("topic", {"d": 64}, runs, "torch", version="v1")
    assert again.name == "fast" and again.cached and len(measured) == 1
    calibration.choose("topic", {"d": 128}, runs, "torch", version="v1")  # another shape
    calibration.choose("topic", {"d": 64}, runs, "torch", version="v2")  # other code
    assert len(measured) == 3
    entries = json.loads((tmp_path / "calibration.json").read_text()).values()
    assert {e["machine"] for e in entries} == {machine.fingerprint()}
    assert all(e["machine_line"] == machine.machine_line() for e in entries)


def test_a_decision_measured_beside_a_busy_neighbour_is_used_but_not_cached(
    monkeypatch, tmp_path, caplog, other_load
):
    monkeypatch.setenv("MODGEN_CACHE", str(tmp_path))
    measured = []

    def fake_measure(candidates, repeats=5):
        measured.append(1)
        return {"torch": 2e-3, "fast": 1e-3}

    other_load.fraction = 0.6  # other processes kept 60% of the CPUs busy
    monkeypatch.setattr(calibration, "measure", fake_measure)
    runs = {"torch": lambda: None, "fast": lambda: None}
    with caplog.at_level(logging.INFO):
        first = calibration.choose("topic", {"d": 64}, runs, "torch")
    assert first.name == "fast" and not first.cached
    assert "other processes kept 60% of the CPUs busy" in caplog.text
    assert not (tmp_path / "calibration.json").exists()
    again = calibration.choose("topic", {"d": 64}, runs, "torch")
    assert not again.cached and len(measured) == 2  # measured again, not read back
    other_load.fraction = 0.02  # a quiet machine: cached
    calibration.choose("topic", {"d": 64}, runs, "torch")
    assert calibration.choose("topic", {"d": 64}, runs, "torch").cached and len(measured) == 3


@pytest.mark.skipif(machine.cpu_busy_seconds() is None, reason="no /proc/stat here")
def test_other_load_sees_another_process_spin_and_not_this_one():
    code = "import time\nt = time.time()\nwhile time.time() - t < 1.5: pass"
    spinner = subprocess.Popen([sys.executable, "-c", code])
    try:
        time.sleep(0.3)  # the child is up and spinning
        with machine.OtherLoad() as load:
            time.sleep(0.8)
    finally:
        spinner.wait()
    cpus = os.cpu_count() or 1
    assert load.fraction is not None and load.fraction > 0.5 / cpus  # one CPU of `cpus` busy
    with machine.OtherLoad() as mine:  # this process's own spinning is not "other"
        t = time.perf_counter()
        while time.perf_counter() - t < 0.5:
            pass
    assert mine.fraction is not None and mine.fraction < load.fraction
    with machine.OtherLoad() as blink:  # a block shorter than a clock tick reads idle
        pass
    assert blink.fraction == 0.0


def test_machine_line_names_the_cpu_its_vector_extensions_threads_and_torch():
    info = machine.cpu_info()
    line = machine.machine_line(info)
    assert info["cpu"] in line and f"{info['threads']} threads" in line
    assert f"torch {info['torch']}" in line
    assert all(ext in line for ext in info["vector_extensions"])
    if info["arch"] == "x86_64":
        assert "avx2" in info["vector_extensions"] or "sse4_2" in info["vector_extensions"]
