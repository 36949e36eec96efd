"""benchmarks/fair_timing.py: the thread search that times each peer at its best thread count, and the load
average printed beside every figure. A fake timer and a fake torch; no benchmark runs."""

from __future__ import annotations

import sys
import types

import pytest

from benchmarks import fair_timing
from benchmarks.fair_timing import best_thread_count, format_search, load_field, search_torch_threads, thread_counts


def test_the_fastest_count_is_kept_and_every_count_is_timed_once_fewest_first():
    seconds = {1: 5.0, 2: 3.0, 3: 4.0, 4: 6.0}  # a busy machine: more threads stop helping past 2
    calls = []

    def run(count):
        calls.append(count)
        return seconds[count]

    best, by_count = best_thread_count(run, [4, 2, 3, 1, 2])
    assert best == 2
    assert by_count == seconds
    assert calls == [1, 2, 3, 4]


def test_on_a_loaded_machine_one_thread_can_win():
    # the figures: transformers at 4.6-4.9 tok/s on every core against 23-24 with one thread
    best, by_count = best_thread_count(lambda count: 1024 / (23.5 if count == 1 else 4.7), range(1, 9))
    assert best == 1 and len(by_count) == 8


def test_a_tie_goes_to_fewer_threads():
    assert best_thread_count(lambda count: 2.0, [3, 1, 2]) == (1, {1: 2.0, 2: 2.0, 3: 2.0})
    assert best_thread_count(lambda count: {1: 3.0, 2: 1.0, 4: 1.0}[count], [4, 2, 1])[0] == 2


def test_no_counts_is_an_error():
    with pytest.raises(ValueError, match="no thread counts"):
        best_thread_count(lambda count: 1.0, [])


def test_thread_counts_are_one_to_the_cores():
    assert thread_counts(4) == [1, 2, 3, 4]
    assert thread_counts(1) == [1]
    assert thread_counts()[0] == 1


def test_the_search_prints_the_count_kept_and_every_counts_seconds():
    assert format_search(2, {2: 0.4312, 1: 0.5123}) == "threads=2 searched=1:0.512s,2:0.431s"


def test_torch_runs_each_timing_at_its_count_and_is_left_at_the_best(monkeypatch):
    fake = types.SimpleNamespace(threads=8)
    fake.set_num_threads = lambda count: setattr(fake, "threads", count)
    monkeypatch.setitem(sys.modules, "torch", fake)
    timed_at = []

    def time_at():
        timed_at.append(fake.threads)
        return {1: 2.0, 2: 1.5, 3: 1.7}[fake.threads]

    assert search_torch_threads(time_at, [1, 2, 3]) == (2, {1: 2.0, 2: 1.5, 3: 1.7})
    assert timed_at == [1, 2, 3]
    assert fake.threads == 2


def test_load_field_formats_the_three_load_averages():
    assert load_field((1.234, 0.98, 0.7749)) == "load=1.23,0.98,0.77"
    assert load_field([0, 10.5, 2]) == "load=0.00,10.50,2.00"


def test_load_field_reads_the_load_now_and_says_when_it_cannot(monkeypatch):
    monkeypatch.setattr(fair_timing.os, "getloadavg", lambda: (3.0, 2.0, 1.0))
    assert load_field() == "load=3.00,2.00,1.00"

    def unavailable():
        raise OSError("no load average")

    monkeypatch.setattr(fair_timing.os, "getloadavg", unavailable)
    assert load_field() == "load=unknown"


def test_the_xla_note_says_our_side_is_not_searched():
    note = fair_timing.xla_threads_note()
    assert "process start" in note and "not searched" in note
