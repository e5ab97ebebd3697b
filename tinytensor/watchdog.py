"""The collective timeout under MPI: a thread per rank that ends the job when the ranks can no
longer meet (torch's process-group timeout, for MPI).

    dist.init()                          # with > 1 rank: starts this rank's Watchdog (600 s)
    dist.watch(60, describe)             # another timeout (0: never), and the end of its line
    dist.progress("step 12")             # where the program is, for the line

Every collective of tinytensor.distributed (and GradientReducer.finish) tells the watchdog
that this rank now waits for the others, and in what ("the gradient allreduce"); only that
waiting is timed, never computing, so a slow step on every rank ends nothing. The thread
ends the job (one `error:` line, then MPI Abort) when this rank

- has waited `timeout` seconds in one collective: exit status 1;
- waits for a rank of its node that has died or exited: exit status 1;
- got SIGINT or SIGTERM while it waits for a rank of its node that does not run (stopped,
  frozen), or got a second one and still waits: the stop at the next step boundary cannot
  happen, so the job ends now with 128 + signum. A blocked main thread cannot run Python's
  signal handlers; signal.set_wakeup_fd tells this thread instead.

The ranks of a node share a small MPI window: each watchdog writes there, every TICK_S, when
it last ran, what its rank waits in (or where it is), how many stop signals it got, its pid.
So a rank names the rank it waits for without that rank's help: one that has not run for
SILENT_S (its process state from /proc: stopped, ...), one whose process is gone, one that is
elsewhere ("runs but has not got there (it is in step 11)"). Ranks on other nodes cannot be
seen: "a rank on another node".

One line, not one per rank: a rank that decides to end the job marks it in its slot and waits
a tick; of the ranks that marked within a tick of the first, the lowest speaks. The others
stay quiet; the speaker's Abort ends them (should it not, each speaks after QUIET_S).
"""
import atexit
import os
import select
import signal
import threading
import time

import numpy as np

DEFAULT_TIMEOUT = 600.0  # seconds, torch's default for NCCL
TICK_S = 0.5             # how often the thread looks, and publishes that it runs
SILENT_S = 3.0           # a rank whose thread has not run for this long does not run
STOP_GRACE_S = 2.0       # after a second stop signal: how long the main thread may still wait
QUIET_S = 10.0           # a rank that let another speak speaks itself after this long

# a rank's slot in the node's shared window: float64 fields, then its text (UTF-8)
STAMP, SINCE, SIGNALS, PID, RANK, STATE, CLAIMED = range(7)
FIELDS, TEXT_BYTES = 7, 240
RUNNING, FINISHED, ENDING = 0.0, 1.0, 2.0
PROCESS_STATES = {"T": "its process is stopped", "t": "its process is stopped by a debugger",
                  "D": "its process waits for the disk or the network"}


class Peer:
    """What the watchdog of another rank on this node last published."""

    def __init__(self, fields, text, now, pids_visible=True):
        self.rank, self.pid, self.pids_visible = int(fields[RANK]), int(fields[PID]), pids_visible
        self.state, self.claimed = fields[STATE], fields[CLAIMED]
        self.waiting = fields[SINCE] > 0
        self.silent_for = now - fields[STAMP]
        self.text = text

    def gone(self):
        """Its process has ended without saying so (killed) or is a zombie."""
        return (self.pids_visible and self.state != FINISHED
                and _process_state(self.pid) in (None, "Z", "X"))

    def problem(self, our_text):
        """Why this rank keeps us waiting in `our_text`, or None when it waits there too."""
        if self.state == FINISHED:
            return f"rank {self.rank} has exited"
        if self.gone():
            return f"rank {self.rank} died (its process is gone)"
        if self.silent_for >= SILENT_S:
            state = _process_state(self.pid) if self.pids_visible else None
            how = PROCESS_STATES.get(state, "it is frozen")
            return f"rank {self.rank} has not run for {self.silent_for:.0f} s ({how})"
        if not self.waiting:
            return f"rank {self.rank} runs but has not got there (it is in {self.text})"
        if self.text != our_text:
            return f"rank {self.rank} waits in another collective: {self.text}"
        return None


class Watchdog:
    """One rank's watchdog (see the module's docstring). comm: the world communicator; node:
    the ranks of this node (an MPI window is shared over it: made collectively); end(text,
    code): prints text and ends every rank. comm None: one process, nothing shared (tests)."""

    def __init__(self, comm, node, end, timeout=DEFAULT_TIMEOUT, clock=time.monotonic):
        self.end, self.clock = end, clock
        self.timeout, self.describe = check_timeout(timeout), None
        self.rank = comm.Get_rank() if comm is not None else 0
        self.node_ranks = node.allgather(self.rank) if node is not None else [self.rank]
        self.others_elsewhere = comm is not None and comm.Get_size() > len(self.node_ranks)
        self.what, self.since, self.where = None, None, "the start-up"
        self.signals, self.signum = 0, None
        self._thread, self._closed, self._wakeup = None, False, None  # _wakeup: (read, write)
        self._slots, self._texts, self._window = [], [], None
        self._pids_visible = True  # the other ranks' pids are processes in this /proc
        if node is not None:
            self._share(node)

    # ----- what the training loop and the collectives tell it (cheap: attributes) --------

    def waiting(self, what):
        """`with watchdog.waiting("the gradient allreduce"):` this rank waits for the others."""
        self.what = what
        self.since = self.clock()
        return self

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.since = None

    # ----- the thread ----------------------------------------------------------------------

    def start(self):
        """Start the thread (a daemon); in the main thread, also watch SIGINT and SIGTERM."""
        if threading.current_thread() is threading.main_thread():
            r, w = os.pipe()
            os.set_blocking(w, False)
            before = signal.set_wakeup_fd(w, warn_on_full_buffer=False)
            if before == -1:
                self._wakeup = (r, w)
            else:  # someone else's (asyncio's): give it back, and leave signals unwatched
                signal.set_wakeup_fd(before)
                os.close(r)
                os.close(w)
        self._thread = threading.Thread(target=self._run, name="Watchdog", daemon=True)
        self._thread.start()
        atexit.register(self.close)  # at a clean exit: the others see this rank exited
        return self

    def close(self):
        """Stop the thread (at its next look; it touches the shared window only while Python
        runs, and mpi4py ends MPI after Python) and mark this rank as exited, not dead."""
        self._closed = True
        if self._slots:
            self._slots[self._mine][STATE] = FINISHED
        if self._wakeup is not None and threading.current_thread() is threading.main_thread():
            signal.set_wakeup_fd(-1)
            os.close(self._wakeup[1])
            self._wakeup = None  # the read end stays open: the thread may still select on it

    def _run(self):
        while not self._closed:
            self._sleep(TICK_S)
            now = self.clock()
            self._publish(now)
            verdict = self.check(now)
            if verdict is not None and not self._closed:
                self._conclude(*verdict)
                return

    def _sleep(self, seconds):
        """Sleep, or less when a signal comes (counted)."""
        wakeup = self._wakeup
        if wakeup is None:
            time.sleep(seconds)
            return
        if select.select(wakeup[:1], [], [], seconds)[0]:
            for signum in os.read(wakeup[0], 64):
                if signum in (signal.SIGINT, signal.SIGTERM):
                    self.signals += 1
                    self.signum = signum

    # ----- the decision --------------------------------------------------------------------

    def check(self, now):
        """None while the ranks can still meet; else (why, exit status) to end the job with."""
        since = self.since
        if since is None:
            return None
        waited, ours = now - since, self._text()
        peers = self.peers(now)
        for p in peers:
            if waited >= 2 * TICK_S and (p.state == FINISHED or p.gone()):
                return f"{p.problem(ours)} while rank {self.rank} waited for it in {ours}", 1
        if self.timeout and waited >= self.timeout:
            return (f"rank {self.rank} waited {waited:.0f} s for the other ranks in {ours}: "
                    f"{self._culprits(peers, ours)}; ending the job (collective timeout "
                    f"{self.timeout:g} s)"), 1
        silent = any(p.silent_for >= SILENT_S for p in peers)
        if self.signals and (silent or self.signals > 1 and waited >= STOP_GRACE_S):
            name = signal.Signals(self.signum).name
            return (f"interrupted by {name} while rank {self.rank} waited for the other ranks "
                    f"in {ours}: {self._culprits(peers, ours)}"), 128 + self.signum
        return None

    def _text(self):
        """Where this rank is: `what in where` while it waits, else `where`."""
        since, what, where = self.since, self.what, self.where
        return f"{what} in {where}" if since is not None else where

    def _culprits(self, peers, ours):
        found = [x for x in (p.problem(ours) for p in peers) if x is not None]
        if found:
            return "; ".join(found)
        if self.others_elsewhere:
            return "a rank on another node has not got there"
        return "every other rank waits there too"

    def _conclude(self, why, code):
        """Mark that this rank ends the job; the lowest of the ranks that marked within a tick
        of the first speaks, the others leave it to that rank (see the module's docstring)."""
        line = "error: " + (self.describe(why) if self.describe is not None else why)
        if self._slots:
            now = self.clock()
            self._publish(now, claimed=now)
            time.sleep(TICK_S)
            claims = [(p.claimed, p.rank) for p in self.peers(self.clock()) if p.claimed]
            claims.append((now, self.rank))
            first = min(c for c, _ in claims)
            speaker = min(r for c, r in claims if c <= first + TICK_S)
            if speaker != self.rank or 0 not in self.node_ranks:
                time.sleep(QUIET_S)  # its Abort ends this rank; if it does not, say it here
        self.end(line, code)

    # ----- the node's shared window --------------------------------------------------------

    def _share(self, node):
        """One slot per rank of the node in an MPI shared-memory window (a collective)."""
        from mpi4py import MPI
        self._window = MPI.Win.Allocate_shared(FIELDS * 8 + TEXT_BYTES, 1, comm=node)
        slots, texts = [], []
        for r in range(node.Get_size()):
            buf, _ = self._window.Shared_query(r)
            slots.append(np.frombuffer(buf, dtype=np.float64, count=FIELDS))
            texts.append(np.frombuffer(buf, dtype=np.uint8, count=TEXT_BYTES, offset=FIELDS * 8))
        self.attach(slots, texts, node.Get_rank())
        node.Barrier()  # every slot is filled in before any thread reads one
        self._pids_visible = all(_process_state(int(slot[PID])) is not None
                                 for slot in self._slots)  # else: other pid namespaces

    def attach(self, slots, texts, mine):
        """Publish in slots (float64 arrays of FIELDS) and texts (uint8 arrays of TEXT_BYTES),
        this rank's at index `mine`: views of the node's shared window, or arrays in a test."""
        self._slots, self._texts, self._mine = slots, texts, mine
        slots[mine][:], texts[mine][:] = 0, 0  # MPI does not promise zeroed memory
        slots[mine][PID], slots[mine][RANK] = os.getpid(), self.rank
        self._publish(self.clock())

    def _publish(self, now, claimed=None):
        if not self._slots:
            return
        slot, since = self._slots[self._mine], self.since
        text = self._text().encode("utf-8", "replace")[:TEXT_BYTES - 1]
        self._texts[self._mine][:len(text) + 1] = np.frombuffer(text + b"\0", dtype=np.uint8)
        slot[SINCE] = since if since is not None else 0.0
        slot[SIGNALS] = self.signals
        if claimed is not None:
            slot[STATE], slot[CLAIMED] = ENDING, claimed
        slot[STAMP] = now

    def peers(self, now):
        """[Peer] for the other ranks of this node."""
        found = []
        for i, (slot, text) in enumerate(zip(self._slots, self._texts)):
            if i != self._mine:
                raw = bytes(text)
                found.append(Peer(slot.copy(), raw[:raw.find(b"\0")].decode("utf-8", "replace"),
                                  now, self._pids_visible))
        return found


def check_timeout(timeout):
    """The timeout in seconds as a float: 0 (never) or at least 1."""
    if isinstance(timeout, bool) or not isinstance(timeout, (int, float)) \
            or not (timeout == 0 or 1 <= timeout < float("inf")):
        raise ValueError(f"timeout must be 0 (never) or at least 1 second, got {timeout!r}")
    return float(timeout)


def _process_state(pid):
    """The state letter of process pid from /proc (R, S, T, Z, ...); None when it is gone,
    '?' when /proc cannot tell."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            return f.read().rsplit(b")", 1)[1].split()[0].decode()
    except FileNotFoundError:
        return None
    except (OSError, IndexError):
        return "?"
