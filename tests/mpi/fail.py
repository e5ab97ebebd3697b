"""Fail-fast scenarios under mpirun (run by test_distributed.py); every one must end the whole
job promptly with a non-zero exit while the other ranks wait in a collective.

    mpirun -n 3 python tests/mpi/fail.py MODE

MODE: raise    rank 1 raises ValueError
      thread   rank 1 raises in a background thread
      kill     rank 1 kills itself with SIGKILL
      mismatch rank 1 has another config: check_consistent raises on every rank, uncaught
      abort    rank 1 calls dist.abort() with a message and exit status 3
"""
import os
import signal
import sys
import threading
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", ".."))
from tinytensor import distributed as dist  # noqa: E402


def main():
    mode = sys.argv[1]
    dist.init()
    r = dist.rank()
    dist.barrier()
    if r == 1:
        time.sleep(0.3)  # the others are waiting in the barrier below by now
        if mode == "raise":
            raise ValueError("boom on purpose")
        if mode == "thread":
            def work():
                raise RuntimeError("boom in a thread")
            threading.Thread(target=work).start()
            time.sleep(60)
        if mode == "kill":
            os.kill(os.getpid(), signal.SIGKILL)
        if mode == "abort":
            dist.abort("stopping on purpose", code=3)
    if mode == "mismatch":
        dist.check_consistent({"lr": 0.1 if r != 1 else 0.2}, [])
    dist.barrier()  # never completes: rank 1 does not get here
    print(f"rank {r}: unreachable", flush=True)


if __name__ == "__main__":
    main()
