"""The plain progress lines (a log, `--plain`): an update held back by the rate limit is printed once its time is
up, and a run whose numbers do not move still prints its state now and then."""

import time

from pipeline.progress import Display, counted


def test_a_held_back_update_is_printed_later_and_a_quiet_run_still_shows_it_is_alive(capsys):
    with Display(plain=True, every_s=0.3, quiet_s=1.0) as display:
        display.add("funcdim", 6)
        display.update("funcdim", 1)  # printed: the first line of the bar
        display.update("funcdim", 2)  # within every_s: held back ...
        time.sleep(0.8)  # ... and printed by the ticker
        held = capsys.readouterr().err
        time.sleep(1.6)  # nothing moves: the state again, once a second
        quiet = capsys.readouterr().err
    assert "funcdim 1/6" in held and "funcdim 2/6" in held
    assert quiet.count("funcdim 2/6") >= 1


def test_counted_says_one_or_many():
    assert counted(1, "population") == "1 population" and counted(3, "population") == "3 populations"
    assert counted(0, "model") == "0 models" and counted(2_000, "model") == "2,000 models"
