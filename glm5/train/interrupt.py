"""Graceful stop on SIGINT / SIGTERM: finish the step, checkpoint, exit 130 / 143.

Ctrl-C sends SIGINT; Slurm and Kubernetes send SIGTERM some seconds before they kill a preempted job. Inside a
:class:`GracefulStop` block the first of either only records the signal; the training loop looks at it at its
step boundary, saves a checkpoint through the usual atomic writer and raises :class:`Interrupted`, which the
command line turns into one line and the exit status 128 + signal (130 for SIGINT, 143 for SIGTERM)::

    with GracefulStop() as stop:
        while not done:
            step()
            if stop.signum:
                raise Interrupted(stop.signum, step, save_checkpoint())

* A second signal restores the default behaviour at once: SIGINT raises ``KeyboardInterrupt``, SIGTERM gets the
  disposition it had before (by default the process ends), so nobody is ever stuck behind a slow step. A repeat
  within ``repeat_window`` seconds (1 s) of the first counts as the same request: a terminal's Ctrl-C reaches
  every process of its foreground group, and torchrun forwards the signal it got to its workers, so each rank
  sees one keypress twice within milliseconds. (torchrun SIGKILLs its workers ``--shutdown-timeout`` seconds,
  default 30, after forwarding: raise it when a step plus a checkpoint takes longer.)
* Handlers are installed only from the main thread (Python allows no other; elsewhere the block does nothing and
  ``signum`` stays None), and the previous ones come back when the block ends: the trainer is also a library
  (speedrun, RL), and its callers keep their own handling.
* Several ranks (torchrun): :func:`agreed_signal` all-reduces the flag (MAX) at the step boundary, so every rank
  stops after the same step even if only one of them got the signal, and none waits in a collective for a
  rank that has left.
"""

from __future__ import annotations

import os
import signal
import threading
import time

import torch
import torch.distributed as dist

__all__ = ["GracefulStop", "Interrupted", "agreed_signal"]

SIGNALS = (signal.SIGINT, signal.SIGTERM)


def _name(signum: int) -> str:
    try:
        return signal.Signals(signum).name
    except ValueError:
        return f"signal {signum}"


class Interrupted(KeyboardInterrupt):
    """A run stopped by a signal after saving ``checkpoint`` at ``step``. A ``KeyboardInterrupt``, so callers
    that do not know it (``glm5 speedrun``, a script) still treat it as an interruption, not as success."""

    def __init__(self, signum: int, step: int, checkpoint):
        self.signum, self.step, self.checkpoint = int(signum), int(step), checkpoint
        super().__init__(self.message)

    @property
    def exit_code(self) -> int:
        """The shell's status for a process ended by the signal: 130 for SIGINT, 143 for SIGTERM."""
        return 128 + self.signum

    @property
    def message(self) -> str:
        return (f"interrupted by {_name(self.signum)} at step {self.step}: checkpoint saved to {self.checkpoint}; "
                f"run the same command to resume")


class GracefulStop:
    """Context manager: the first SIGINT / SIGTERM sets :attr:`signum` (see the module docstring).

    ``announce``: write one line to stderr when the first signal arrives (the step may take a while; the line
    says a second signal stops at once). Pass False on all ranks but the first."""

    def __init__(self, repeat_window: float = 1.0, announce: bool = True):
        self.repeat_window = repeat_window
        self.announce = announce
        self.signum: int | None = None
        self._first_at = 0.0
        self._previous: dict = {}

    @property
    def installed(self) -> bool:
        return bool(self._previous)

    def __enter__(self) -> "GracefulStop":
        if threading.current_thread() is threading.main_thread():
            for s in SIGNALS:
                self._previous[s] = signal.getsignal(s)
                signal.signal(s, self._handle)
        return self

    def __exit__(self, *exc) -> bool:
        self._restore()
        return False

    def _restore(self) -> None:
        for s, h in self._previous.items():
            signal.signal(s, h if h is not None else signal.SIG_DFL)  # None: set outside Python; the default
        self._previous = {}

    def _handle(self, signum: int, frame) -> None:
        now = time.monotonic()
        if self.signum is None:
            self.signum, self._first_at = signum, now
            if self.announce:
                again = "Ctrl-C" if signum == signal.SIGINT else _name(signum)
                # os.write, not print: the signal may have arrived in the middle of a write to sys.stderr
                os.write(2, f"\n{_name(signum)}: stopping after this step with a checkpoint "
                            f"({again} again to stop at once)\n".encode())
            return
        if now - self._first_at < self.repeat_window:
            return  # the same request delivered twice (terminal process group + launcher)
        previous = self._previous.get(signum, signal.SIG_DFL)
        self._restore()
        if signum == signal.SIGINT:
            raise KeyboardInterrupt
        if callable(previous):
            previous(signum, frame)
        elif previous != signal.SIG_IGN:
            signal.signal(signum, signal.SIG_DFL)
            os.kill(os.getpid(), signum)


def agreed_signal(signum: int | None, device: torch.device | str = "cpu") -> int | None:
    """The signal any rank has received (the largest number: SIGTERM over SIGINT), or None. With several
    ranks this is a collective: every rank calls it at the same point of every step."""
    if not (dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1):
        return signum or None
    t = torch.tensor([signum or 0], dtype=torch.int64, device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return int(t.item()) or None
