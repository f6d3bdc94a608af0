"""Progress output: a live bar on a terminal, a few whole lines in a log."""

from __future__ import annotations

import io

from pipeline.progress import progress_bar


class FakeTerminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_a_log_gets_whole_lines_without_carriage_returns():
    log = io.StringIO()
    with progress_bar(total=500, desc="propose", unit="img", stream=log, leave=False) as bar:
        for _ in range(500):
            bar.set_postfix(loss="0.1", refresh=False)
            bar.update()
    log.write("propose: done\n")
    text = log.getvalue()
    assert "\r" not in text
    lines = text.splitlines()
    assert 2 <= len(lines) <= 4, lines
    assert lines[-2].startswith("propose: 500/500 img (100%)") and lines[-1] == "propose: done"


def test_a_bar_whose_last_update_was_drawn_logs_that_state_once():
    log = io.StringIO()
    with progress_bar(total=3, desc="fit", unit="epoch", stream=log) as bar:
        for epoch in range(3):
            bar.set_postfix(loss=f"{epoch}", refresh=False)
            bar.update()
        bar.refresh()  # what the timed redraw does when the interval ends on the last update; closing redraws it
    lines = log.getvalue().splitlines()
    assert len(lines) == len(set(lines)), lines
    assert lines[-1].startswith("fit: 3/3 epoch (100%)") and lines[-1].endswith("loss=2")


def test_a_terminal_gets_the_live_bar():
    terminal = FakeTerminal()
    for _ in progress_bar(range(3), desc="fit", stream=terminal):
        pass
    assert "\r" in terminal.getvalue() and "fit: 100%" in terminal.getvalue()


def test_a_disabled_bar_writes_nothing():
    log = io.StringIO()
    assert list(progress_bar(range(3), enabled=False, stream=log)) == [0, 1, 2]
    assert log.getvalue() == ""
