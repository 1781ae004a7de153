"""Progress for a person who is not watching a terminal: plain, flushed lines in a log file."""

import io
import re
import sys

from nmm.progress import TrainProgress, format_duration, format_losses, plain_stream, progress_callback


class Log(io.StringIO):
    """A log file: not a terminal, and it counts flushes."""

    flushes = 0

    def flush(self):
        self.flushes += 1
        super().flush()


class Terminal(io.StringIO):
    def isatty(self):
        return True


def record(step, loss):
    return {"step": step, "loss": loss, "loss_text": loss + 0.5, "loss_image": loss - 0.5, "lr": 1e-3,
            "tokens_per_s": 6400.0, "mfu": 0.42, "elapsed_s": 0.1 * step}


def test_plain_lines_have_stage_step_losses_speed_and_eta():
    log = Log()
    bar = TrainProgress(10, 0, description="train", stream=log, interval=0)
    assert bar.enabled and not bar.rich
    for step in range(1, 11):
        bar.update(step, record(step, 3.0) if step % 2 == 0 else None)
    bar.close()
    lines = log.getvalue().splitlines()
    assert len(lines) == 10  # one per update below the total, and the final one
    assert lines[0].startswith("[train] step 1/10 (10%)") and "eta" in lines[0] and "elapsed" in lines[0]
    assert "loss" not in lines[0]  # nothing logged yet: no made-up loss
    line = lines[3]
    assert line.startswith("[train] step 4/10 (40%)")
    assert "loss 3.000 (text 3.500, image 2.500)" in line and "6.4k tok/s, MFU 42%" in line
    assert re.search(r"elapsed \d+s  eta \d+s$", line)
    assert lines[-1].startswith("[train] done: 10/10 steps in ") and "loss 3.000" in lines[-1]
    assert "MFU 42% (mean)" in lines[-1]
    assert log.flushes >= len(lines)  # each line reaches the file at once


def test_lines_average_the_records_since_the_previous_line():
    log = Log()
    bar = TrainProgress(100, 0, stream=log, interval=3600)
    bar.update(1, record(1, 2.0))
    bar.update(2, record(2, 4.0))
    assert log.getvalue() == ""  # the interval has not passed
    bar.close()
    (line,) = log.getvalue().splitlines()
    assert "done: 2/100" in line and "loss 3.000 (text 3.500, image 2.500)" in line


def test_interval_and_spike_and_resume():
    log = Log()
    bar = TrainProgress(50, 40, description="train", stream=log, interval=0)
    bar.update(41, {**record(41, 1.0), "loss_spike": True})
    bar.update(42, None)
    bar.close()
    bar.close()  # twice is harmless
    lines = log.getvalue().splitlines()
    assert "[loss spike]" in lines[0] and "spike" not in lines[1]
    assert lines[0].startswith("[train] step 41/50") and len(lines) == 3


def test_tokenizer_callback_writes_plain_lines_and_a_final_line():
    log = Log()
    callback = progress_callback("image tokenizer", stream=log, interval=0)
    for step in range(1, 5):
        callback(step, 4, 1.0 / step)
    lines = log.getvalue().splitlines()
    assert lines[0] == lines[0].strip() and lines[0].startswith("[image tokenizer] step 1/4 (25%)  loss 1.000")
    assert lines[-1].startswith("[image tokenizer] done: 4/4 steps") and "loss 0.250" in lines[-1]
    assert len(lines) == 4


def test_disabled_and_terminal_streams_write_nothing():
    log = Log()
    bar = TrainProgress(5, 0, enabled=False, stream=log, interval=0)
    bar.update(1, record(1, 1.0))
    bar.close()
    assert log.getvalue() == "" and not bar.enabled
    tty = Terminal()
    bar = TrainProgress(5, 0, stream=tty, interval=0)
    bar.update(1, record(1, 1.0))
    bar.close()
    assert tty.getvalue() == ""


def test_the_stream_is_chosen_by_what_is_redirected(monkeypatch):
    out, err = Log(), Terminal()
    monkeypatch.setattr(sys, "stdout", out)
    monkeypatch.setattr(sys, "stderr", err)
    assert plain_stream() is out  # `nmm demo > log.txt`: the bar stays on the terminal, lines go to the file
    monkeypatch.setattr(sys, "stdout", Terminal())
    monkeypatch.setattr(sys, "stderr", out)
    assert plain_stream() is out  # `nmm demo 2> log.txt`
    monkeypatch.setattr(sys, "stderr", Terminal())
    assert plain_stream() is None  # both on a terminal: only the bar
    # With nothing on a terminal, a default TrainProgress writes plain lines to stdout.
    monkeypatch.setattr(sys, "stdout", out)
    monkeypatch.setattr(sys, "stderr", Log())
    monkeypatch.setenv("NMM_PROGRESS_INTERVAL", "0")
    bar = TrainProgress(3, 0, description="train")
    bar.update(1, record(1, 2.0))
    bar.close()
    assert "[train] step 1/3" in out.getvalue() and "[train] done: 1/3" in out.getvalue()


def test_formatting_helpers():
    assert [format_duration(s) for s in (0, 59.4, 61, 3599, 3720, None, float("nan"))] == \
        ["0s", "59s", "1m01s", "59m59s", "1h02m", "?", "?"]
    assert format_losses({"loss": 1.0, "loss_spike": False}) == "loss 1.000"
    assert format_losses({"loss_text": 0.25}) == "text 0.250"
