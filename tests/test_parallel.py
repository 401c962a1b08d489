"""eval/parallel.py: independent evaluations in spawned processes, each with its share of the threads."""

from __future__ import annotations

import json
import os

import pytest
import torch

from kensa_vl.eval.parallel import side_by_side, timed


def test_tasks_run_in_other_processes_with_a_share_of_the_threads_and_answer_in_order():
    if torch.get_num_threads() < 2:
        pytest.skip("needs two torch threads to split")
    tasks = [(os.getpid, {}), (torch.get_num_threads, {}), (json.loads, {"s": "[1, 2]"})]
    pid, threads, parsed = side_by_side(tasks)
    assert pid != os.getpid() and threads == torch.get_num_threads() // 2 and parsed == [1, 2]
    with pytest.raises(json.JSONDecodeError):  # a task's error reaches the caller
        side_by_side([(json.loads, {"s": "{"}), (os.getpid, {})])


def test_one_worker_runs_the_tasks_here_in_turn():
    assert side_by_side([(os.getpid, {}), (json.loads, {"s": "3"})], workers=1) == [os.getpid(), 3]


def test_a_worker_that_dies_is_named_not_a_bare_broken_pool():
    if torch.get_num_threads() < 2:
        pytest.skip("needs two torch threads to split")
    with pytest.raises(RuntimeError, match=r"ended abruptly.*unfinished: .*_exit"):
        side_by_side([(os._exit, {"status": 3}), (json.loads, {"s": "1"})])
    with pytest.raises(RuntimeError, match=r"unfinished: .*_exit"):  # a timed task by its own name
        side_by_side([(timed(os._exit), {"status": 3}), (json.loads, {"s": "1"})])
    (value, seconds), _ = side_by_side([(timed(json.loads), {"s": "[2]"}), (os.getpid, {})])
    assert value == [2] and seconds > 0
