"""megatron_lcr.verify.math_verify: math-verify on and off the main thread, and the outer timer kept.

The equivalence cases themselves (fractions, bare expressions, unparsable input) are the ``math``
reward's, in tests/rl/test_rewards.py.
"""

import signal
import threading

from megatron_lcr.verify import math_verify
from megatron_lcr.verify.math_verify import math_equivalent


def on_a_thread(checks: dict[str, tuple[str, list[str]]]) -> dict[str, bool]:
    """``math_equivalent`` of each ``(prediction, golds)`` from a thread other than the main one."""
    results = {}

    def score():
        for name, (prediction, golds) in checks.items():
            results[name] = math_equivalent(prediction, golds)

    thread = threading.Thread(target=score)
    thread.start()
    thread.join(timeout=180)
    assert not thread.is_alive()
    return results


def test_off_the_main_thread_the_helper_process_gives_the_same_answers():
    # math-verify's SIGALRM timeouts cannot be set there; the helper child must answer as in place.
    checks = {"half": ("0.5", ["\\frac{1}{2}"]), "wrong": ("7", ["8"]), "second_gold": ("5", ["3", "5"])}
    expected = {name: math_equivalent(prediction, golds) for name, (prediction, golds) in checks.items()}
    assert expected == {"half": True, "wrong": False, "second_gold": True}
    assert on_a_thread(checks) == expected


def test_a_helper_process_that_died_is_replaced():
    assert on_a_thread({"one": ("1", ["1"])}) == {"one": True}
    dead = math_verify._MATH_CHILD._proc
    dead.kill()
    dead.wait()
    assert on_a_thread({"half": ("0.5", ["\\frac{1}{2}"])}) == {"half": True}
    assert math_verify._MATH_CHILD._proc is not dead


def test_an_outer_real_timer_stays_armed():
    # math-verify ends each check with alarm(0), which would silently cancel e.g. pytest-timeout.
    fired = []
    old = signal.signal(signal.SIGALRM, lambda *_: fired.append(True))
    try:
        signal.setitimer(signal.ITIMER_REAL, 100.0)
        assert math_equivalent("2", ["2"])
        remaining, _ = signal.getitimer(signal.ITIMER_REAL)
        assert 90.0 < remaining <= 100.0
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, old)
    assert not fired
