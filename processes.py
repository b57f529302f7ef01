"""Process lifetime: workers die with their parent, and SIGTERM stops a run the way SIGINT (Ctrl-C) does.

- :func:`die_with_parent` is called at the start of every worker process (the converter's process pool, DataLoader
  workers) and of training processes started by a launcher (``accelerate launch`` / ``torchrun``). On Linux the
  kernel sends a signal when the parent dies (``prctl(PR_SET_PDEATHSIG)``); where that is unavailable, a daemon
  thread polls ``os.getppid()`` and signals this process once the parent is gone. So a killed converter or
  launcher (even with SIGKILL, which it cannot handle) leaves no worker behind.
- :class:`StopSignals` turns SIGINT and SIGTERM into a request that the training loop answers at its next optimiser
  step (the state is saved, then the run exits with 130, as for Ctrl-C); a second Ctrl-C interrupts at once.
  DataLoader workers ignore both (:func:`worker_init`) and end with their process.
  :func:`sigterm_as_keyboard_interrupt` makes SIGTERM raise KeyboardInterrupt, for code that already stops cleanly on
  Ctrl-C (the converter).
"""
from __future__ import annotations

import atexit
import ctypes
import ctypes.util
import multiprocessing
import os
import signal
import sys
import threading
import time
from types import FrameType

_PR_SET_PDEATHSIG = 1
POLL_SECONDS = 1.0
INTERRUPTED_EXIT_CODE = 130  # what a shell reports for a process stopped by SIGINT
_watched_parent: int | None = None


def _set_pdeathsig(sig: int) -> bool:
    """Linux: the kernel sends `sig` to this process when its parent thread exits. False where unavailable."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
        return libc.prctl(_PR_SET_PDEATHSIG, sig, 0, 0, 0) == 0
    except (OSError, AttributeError):
        return False


GRACE_SECONDS = 120  # after a clean-stop signal, a process that has not exited is ended


def _poll_parent(parent: int, sig: int) -> None:
    while os.getppid() == parent:
        time.sleep(POLL_SECONDS)
    _orphaned(sig)  # re-parented: the parent died


def _orphaned(sig: int) -> None:
    os.kill(os.getpid(), sig)
    if sig != signal.SIGKILL:  # a handler that stops cleanly (saving state) gets its chance, then we end
        time.sleep(GRACE_SECONDS)
        os._exit(INTERRUPTED_EXIT_CODE)


def die_with_parent(parent: int | None = None, sig: int = signal.SIGKILL) -> None:
    """Make this process receive `sig` when its parent process dies (idempotent per process). `parent`, the pid of
    the process that started this one, detects a parent that died before the watch began."""
    global _watched_parent
    parent = os.getppid() if parent is None else parent
    if _watched_parent == parent:
        return
    _watched_parent = parent
    kernel_watch = _set_pdeathsig(sig)
    if os.getppid() != parent:  # already orphaned
        threading.Thread(target=_orphaned, args=(sig,), daemon=True).start()
    elif not kernel_watch:  # the portable fallback (one signal only: a second one would interrupt a clean stop)
        threading.Thread(target=_poll_parent, args=(parent, sig), name="parent-death-watch", daemon=True).start()


def worker_init(parent: int, *unused: object) -> None:
    """DataLoader worker_init_fn (bound to the loader's process with functools.partial): the worker dies with
    `parent` and leaves SIGINT and SIGTERM to it. A signal sent to the whole process group (Ctrl-C, torchrun stopping
    its workers, a job scheduler) then stops the training process cleanly instead of killing its workers under it;
    the training process ends them as it exits (end_workers_at_exit)."""
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, signal.SIG_IGN)
    die_with_parent(parent)


def pool_worker_init(parent: int) -> None:
    """ProcessPoolExecutor initializer: the worker dies with `parent` and leaves Ctrl-C to it (it finishes its task
    while the parent stops). SIGTERM keeps its default: the pool ends broken workers with it and then waits for them."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    die_with_parent(parent)


_ending_workers_at_exit = False


def end_workers_at_exit() -> None:
    """Worker processes ignore SIGTERM (worker_init), which multiprocessing sends its daemonic children at exit
    before joining them (DataLoader workers are ended that way: torch leaves them to it). So at exit this process
    ends them with SIGKILL first (atexit hooks run last-registered first, so this runs before multiprocessing's)."""
    global _ending_workers_at_exit
    if not _ending_workers_at_exit:
        _ending_workers_at_exit = True
        atexit.register(_kill_daemonic_children)


def _kill_daemonic_children() -> None:
    children = [child for child in multiprocessing.active_children() if child.daemon]
    if children:
        signal.signal(signal.SIGCHLD, signal.SIG_DFL)  # torch's DataLoader handler would report them as failures
        for child in children:
            child.kill()
            child.join(timeout=5)


def die_with_launcher() -> None:
    """In a process started by torchrun / accelerate launch: stop cleanly (as on SIGTERM) when the launcher dies."""
    if "TORCHELASTIC_RUN_ID" in os.environ:
        die_with_parent(sig=signal.SIGTERM)


class StopSignals:
    """Context manager: SIGINT / SIGTERM set `requested` (the signal's name) instead of killing the process; a second
    SIGINT (Ctrl-C twice) raises KeyboardInterrupt at once. Repeated SIGTERMs change nothing: a launcher or scheduler
    that gives up waiting sends SIGKILL, and the kernel may send the parent-death signal more than once (once per
    thread of the dying parent). Previous handlers are restored on exit."""

    SIGNALS = (signal.SIGINT, signal.SIGTERM)

    def __init__(self) -> None:
        self.requested: str | None = None
        self._previous: dict[int, object] = {}

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        if self.requested is not None and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.requested = self.requested or signal.Signals(signum).name

    def __enter__(self) -> StopSignals:
        if threading.current_thread() is threading.main_thread():
            for sig in self.SIGNALS:
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc: object) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)


def sigterm_as_keyboard_interrupt() -> None:
    """SIGTERM raises KeyboardInterrupt in the main thread, so that it stops like Ctrl-C."""
    def handle(signum: int, frame: FrameType | None) -> None:
        raise KeyboardInterrupt
    signal.signal(signal.SIGTERM, handle)
