"""tinytensor.watchdog in one process: what ends the job and what does not, with a fake clock
and fake slots for the other ranks of the node (the MPI cases: test_distributed.py and
test_train_mpi.py)."""
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from tinytensor import distributed as dist
from tinytensor import watchdog as wd


class Clock:
    def __init__(self):
        self.now = 1000.0

    def __call__(self):
        return self.now


def make(timeout=5, peers=0):
    """A Watchdog of rank 0 on a fake clock, with `peers` other ranks on its node (fake slots:
    running, at the start-up, their stamps fresh), and the lines it would end the job with."""
    clock, ended = Clock(), []
    w = wd.Watchdog(None, None, lambda line, code: ended.append((line, code)), timeout, clock)
    slots = [np.zeros(wd.FIELDS) for _ in range(peers + 1)]
    texts = [np.zeros(wd.TEXT_BYTES, dtype=np.uint8) for _ in range(peers + 1)]
    w.attach(slots, texts, 0)
    for r in range(1, peers + 1):
        slots[r][wd.RANK], slots[r][wd.PID], slots[r][wd.STAMP] = r, os.getpid(), clock.now
        publish(w, r, "the start-up")
    return w, clock, ended


def publish(w, r, text, waiting=False):
    """Fake rank r's watchdog: it is at `text` (waiting in it, or not), its stamp fresh."""
    raw = text.encode() + b"\0"
    w._texts[r][:] = 0
    w._texts[r][:len(raw)] = np.frombuffer(raw, dtype=np.uint8)
    w._slots[r][wd.SINCE] = w.clock() if waiting else 0.0
    w._slots[r][wd.STAMP] = w.clock()


def test_computing_is_never_timed_only_waiting_for_the_others():
    w, clock, _ = make(timeout=5)
    w.where = "step 12"
    clock.now += 3600  # an hour of computing between two collectives: nothing to say
    assert w.check(clock()) is None
    with w.waiting("the gradient allreduce"):
        clock.now += 4.9
        assert w.check(clock()) is None
        clock.now += 0.2
        why, code = w.check(clock())
    assert code == 1 and why == ("rank 0 waited 5 s for the other ranks in the gradient allreduce "
                                 "in step 12: every other rank waits there too; ending the job "
                                 "(collective timeout 5 s)")
    assert w.check(clock()) is None  # the wait is over


def test_timeout_0_never_ends_the_job_and_bad_timeouts_are_refused():
    w, clock, _ = make(timeout=0)
    with w.waiting("a barrier"):
        clock.now += 1e6
        assert w.check(clock()) is None
    for bad in (-1, 0.5, float("inf"), float("nan"), True, "60"):
        with pytest.raises(ValueError, match="timeout must be 0 \\(never\\) or at least 1 second"):
            dist.watch(bad)
    dist.watch(60)  # one process: checked, nothing started


def test_the_rank_that_keeps_the_others_waiting_is_named():
    w, clock, _ = make(timeout=5, peers=3)
    w.where = "step 12"
    with w.waiting("the gradient allreduce"):
        publish(w, 1, "the gradient allreduce in step 12", waiting=True)  # waits with us
        publish(w, 2, "the evaluation of step 12")                          # busy elsewhere
        publish(w, 3, "the gradient allreduce in step 12", waiting=True)
        clock.now += 6
        for r in (1, 2):
            w._slots[r][wd.STAMP] = clock()  # their threads run; rank 3's does not
        why, code = w.check(clock())
    # (rank 3's pid is this process, which runs: a rank whose watchdog does not run is frozen)
    assert why == ("rank 0 waited 6 s for the other ranks in the gradient allreduce in step 12: "
                   "rank 2 runs but has not got there (it is in the evaluation of step 12); "
                   "rank 3 has not run for 6 s (it is frozen); ending the job (collective "
                   "timeout 5 s)")


def test_a_stopped_rank_is_named_from_its_process_state():
    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        os.kill(child.pid, signal.SIGSTOP)
        deadline = time.monotonic() + 10
        while wd._process_state(child.pid) != "T" and time.monotonic() < deadline:
            time.sleep(0.01)
        w, clock, _ = make(timeout=5, peers=1)
        w._slots[1][wd.PID] = child.pid
        with w.waiting("a barrier"):
            clock.now += 5
            assert "rank 1 has not run for 5 s (its process is stopped)" in w.check(clock())[0]
    finally:
        child.kill()
        child.wait()


def test_a_rank_that_died_or_exited_ends_the_job_at_once():
    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait()  # its pid names no process now
    w, clock, _ = make(timeout=600, peers=2)
    w._slots[1][wd.PID] = gone.pid
    w.where = "step 7"
    assert w.check(clock()) is None  # not waiting: a rank may end before the others
    with w.waiting("an allreduce"):
        clock.now += 0.5
        assert w.check(clock()) is None  # (a moment to finish the collective it left)
        clock.now += 0.5
        assert w.check(clock()) == ("rank 1 died (its process is gone) while rank 0 waited for it "
                                    "in an allreduce in step 7", 1)
        w._slots[1][wd.PID] = os.getpid()
        w._slots[2][wd.STATE] = wd.FINISHED
        assert w.check(clock()) == ("rank 2 has exited while rank 0 waited for it in an allreduce "
                                    "in step 7", 1)


def test_a_stop_signal_while_waiting_for_a_silent_rank_ends_the_job_now():
    w, clock, _ = make(timeout=600, peers=1)
    w.where = "step 3"
    with w.waiting("the gradient allreduce"):
        w.signals, w.signum = 1, signal.SIGTERM
        clock.now += 2
        w._slots[1][wd.STAMP] = clock()
        assert w.check(clock()) is None  # every rank runs: the stop at the step boundary comes
        clock.now += wd.SILENT_S
        why, code = w.check(clock())
    assert code == 143 and why.startswith(
        "interrupted by SIGTERM while rank 0 waited for the other ranks in the gradient "
        "allreduce in step 3: rank 1 has not run for 3 s (")
    # a second signal: the main thread still waits after STOP_GRACE_S, whatever the others do
    w, clock, _ = make(timeout=600, peers=1)
    with w.waiting("a barrier"):
        w.signals, w.signum = 2, signal.SIGINT
        clock.now += wd.STOP_GRACE_S
        w._slots[1][wd.STAMP] = clock()
        assert w.check(clock()) == ("interrupted by SIGINT while rank 0 waited for the other "
                                    "ranks in a barrier in the start-up: rank 1 runs but has not "
                                    "got there (it is in the start-up)", 130)


def test_the_thread_ends_the_job_with_describe_and_sees_signals():
    ended = []
    w = wd.Watchdog(None, None, lambda line, code: ended.append((line, code)), timeout=1)
    w.describe = lambda why: why + "; out/ckpt.npz (step 6) is intact"
    before = signal.signal(signal.SIGTERM, lambda *a: None)
    try:
        w.start()
        os.kill(os.getpid(), signal.SIGTERM)
        with w.waiting("a barrier"):
            deadline = time.monotonic() + 10
            while not ended and time.monotonic() < deadline:
                time.sleep(0.05)
        assert w.signals == 1 and w.signum == signal.SIGTERM
    finally:
        w.close()
        signal.signal(signal.SIGTERM, before)
    assert ended == [("error: rank 0 waited 1 s for the other ranks in a barrier in the start-up: "
                      "every other rank waits there too; ending the job (collective timeout 1 s); "
                      "out/ckpt.npz (step 6) is intact", 1)]
    assert signal.set_wakeup_fd(-1) == -1  # close() gave the wakeup fd back
