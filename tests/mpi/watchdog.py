"""The collective timeout under mpirun (run by test_distributed.py): only waiting for the other
ranks is timed, and a rank that keeps the others waiting ends the job with one line naming it.

    mpirun -n 3 python tests/mpi/watchdog.py MODE

MODE: slow   every rank sleeps 2.5 s between collectives, timeout 1 s: nothing happens, OK
      late   the last rank sleeps 60 s before a barrier, timeout 1 s: the others end the job
      exit   the last rank returns (exit status 0) while the others wait in a barrier
      died   the last rank is killed (SIGKILL) while the others wait in a barrier; it runs
             in a child process that mpirun does not know of, so that mpirun does not end
             the job first (as launchers that leave the other ranks running)
"""
import os
import signal
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", ".."))
from tinytensor import distributed as dist  # noqa: E402


def main():
    mode = sys.argv[1]
    if mode == "died" and int(os.environ["PMI_RANK"]) == int(os.environ["PMI_SIZE"]) - 1:
        if os.fork():  # the process mpirun started: it waits until the job is ended
            time.sleep(60)
            return
    dist.init()
    dist.watch(1)
    r, last = dist.rank(), dist.world_size() - 1
    if mode == "slow":
        for i in range(2):
            dist.progress(f"round {i}")
            time.sleep(2.5)  # as a long step on every rank: not waiting, never timed
            dist.barrier()
        if r == 0:
            print("OK", flush=True)
        return
    dist.progress("the test")
    if r == last:
        if mode == "exit":
            return
        if mode == "died":
            time.sleep(0.5)  # the others wait in the barrier by now
            os.kill(os.getpid(), signal.SIGKILL)
        time.sleep(60)
    dist.barrier()  # the others wait here for the last rank
    print(f"rank {r}: unreachable", flush=True)


if __name__ == "__main__":
    main()
