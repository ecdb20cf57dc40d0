"""rollout/engines.py: rank 0's messages to the other ranks while a rollout batch is generated."""

from __future__ import annotations

import concurrent.futures
import threading
import time

from megatron_lcr.rollout import engines


def test_a_long_batch_sends_heartbeats_then_its_completions(monkeypatch):
    """The other ranks wait for the batch in a collective: rank 0 answers 'wait' every _HEARTBEAT_S, so
    a batch longer than the collective timeout does not fail the job, then 'done' with the results."""
    monkeypatch.setattr(engines, "_HEARTBEAT_S", 0.3)
    monkeypatch.setattr(engines, "_CATCH_UP_POLL_S", 0.05)
    rank0 = engines.Engines.__new__(engines.Engines)  # only the message loop: no servers, no process group
    rank0._stale = threading.Event()
    batch = concurrent.futures.Future()
    started = time.monotonic()
    assert rank0._next_message(batch) == ("wait", None)
    assert 0.3 <= time.monotonic() - started < 2.0
    batch.set_result(["completion"])
    assert rank0._next_message(batch) == ("done", ["completion"])
    failed = concurrent.futures.Future()
    failed.set_exception(RuntimeError("server gone"))
    assert rank0._next_message(failed) == ("error", "RuntimeError: server gone")
