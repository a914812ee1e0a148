"""The demo's runner (scripts/toy_demo.py): commands started side by side, at most `parallel` at once, each logged;
a command that fails stops the others and ends the demo with its log's last lines."""
import time

import pytest

from tests.helpers.repo import load_script


@pytest.fixture
def demo(tmp_path, monkeypatch):
    """toy_demo with two commands of its own: `sleep.py SECONDS` and `fail.py CODE`."""
    module = load_script("toy_demo")
    (tmp_path / "sleep.py").write_text("import sys, time\nprint('sleeping')\ntime.sleep(float(sys.argv[1]))\n")
    (tmp_path / "fail.py").write_text("import sys\nprint('something broke')\nsys.exit(int(sys.argv[1]))\n")
    monkeypatch.setitem(module.COMMANDS, "sleep.py", tmp_path / "sleep.py")
    monkeypatch.setitem(module.COMMANDS, "fail.py", tmp_path / "fail.py")
    return module


def test_a_third_command_waits_for_the_first_of_two(demo, tmp_path):
    runner = demo.Runner(tmp_path / "out", threads=1, parallel=2)
    first = runner.start("samples", "first", "sleep.py", "0.2")
    second = runner.start("samples", "second", "sleep.py", "30")
    assert runner.running == [first, second]
    third = runner.start("fine-tune", "third", "sleep.py", "0")
    assert first.process.returncode == 0 and runner.running == [second, third]
    runner.stop()
    assert second.process.returncode is not None and runner.running == []
    assert (tmp_path / "out" / "logs" / "first.log").read_text() == "sleeping\n"
    assert set(runner.stages) == {"samples"} and len(runner.commands) == 3


def test_a_failed_command_stops_the_others_with_its_log(demo, tmp_path):
    runner = demo.Runner(tmp_path / "out", threads=1, parallel=2)
    sleeper = runner.start("samples", "sleeper", "sleep.py", "30")
    with pytest.raises(SystemExit) as failed:
        runner.run("fine-tune", "broken", "fail.py", "3")
    message = str(failed.value).splitlines()
    assert message[0] == "something broke"
    assert message[-1] == f"error: the broken step failed (exit 3); log: {tmp_path / 'out' / 'logs' / 'broken.log'}"
    assert sleeper.process.returncode is not None and runner.running == []


def test_one_at_a_time_runs_in_order(demo, tmp_path):
    runner = demo.Runner(tmp_path / "out", threads=1)
    first = runner.start("samples", "first", "sleep.py", "0")
    second = runner.start("samples", "second", "sleep.py", "0")
    assert first.process.returncode == 0 and runner.running == [second]
    runner.finish()
    assert runner.running == [] and second.process.returncode == 0


def test_a_command_is_timed_until_it_ends_not_until_it_is_waited_for(demo, tmp_path):
    runner = demo.Runner(tmp_path / "out", threads=1, parallel=2)
    job = runner.start("samples", "quick", "sleep.py", "0")
    job.process.wait()
    time.sleep(2)
    runner.finish()
    assert runner.stages["samples"] < 1.5 <= runner.seconds()
