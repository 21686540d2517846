"""Stopping a run cleanly on a cluster's warning signal.

SLURM sends ``SIGUSR1`` some time before a job's limit (``#SBATCH --signal=USR1@120``) and
``SIGTERM`` when it preempts or cancels a job. ``PreemptionSignal`` turns either into a flag;
after every optimizer step a training loop asks ``requested()``, which all ranks answer alike
(from the flag the engine's per-step collective carried, ``TrainEngine.stop_signal``, or one
all-reduce), so all ranks stop after the same step even when only one of them got the signal.
The loop then saves a complete checkpoint and raises ``Preempted``; the stage's command line
exits with ``PREEMPTED_EXIT_CODE``, which ``launch/slurm_pretrain.sbatch`` answers by
requeueing the job, and the requeued run continues with ``checkpoint.resume=auto``.
"""
from __future__ import annotations

import logging
import signal
from types import FrameType

from runtime.dist import all_reduce_max
from runtime.errors import RunStopped

logger = logging.getLogger(__name__)

# EX_TEMPFAIL: "try again later", what a requeued job is
PREEMPTED_EXIT_CODE = 75
STOP_SIGNALS = (signal.SIGUSR1, signal.SIGTERM)


class Preempted(RunStopped):
    """A stop signal ended the run after a complete checkpoint at ``step``."""

    exit_code = PREEMPTED_EXIT_CODE

    def __init__(self, step: int, out_dir: str,
                 resume: str = "run again with checkpoint.resume=auto"):
        super().__init__(f"stopped by a signal after step {step}; the checkpoint of that step is "
                         f"complete in {out_dir}: {resume}")
        self.step, self.out_dir = step, out_dir


class PreemptionSignal:
    """While installed (``install()`` ... ``restore()``, or as a context manager),
    ``STOP_SIGNALS`` set a flag instead of ending the process. Install it in the main thread;
    loader workers forked afterwards inherit the handler, so a signal sent to the whole process
    group does not kill them."""

    def __init__(self, signals: tuple[signal.Signals, ...] = STOP_SIGNALS):
        self.signals, self.received, self._previous = signals, None, {}
        self._agreed: bool | None = None

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        if self.received is None:
            logger.warning("received %s: stopping after this step with a checkpoint",
                           signal.Signals(signum).name)
        self.received = signum

    def install(self) -> "PreemptionSignal":
        for sig in self.signals:
            self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def restore(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()

    def __enter__(self) -> "PreemptionSignal":
        return self.install()

    def __exit__(self, *exc) -> None:
        self.restore()

    def local_flag(self) -> float:
        """1.0 when this rank got a stop signal, else 0.0 (what the collective reduces)."""
        return 1.0 if self.received is not None else 0.0

    def agree(self, any_rank: bool) -> None:
        """Record the max of ``local_flag()`` over ranks computed by a collective the ranks ran
        anyway (``TrainEngine.step``'s non-finite check), so the next ``requested()`` needs
        none."""
        self._agreed = any_rank

    def requested(self) -> bool:
        """Whether any rank got a stop signal: what ``agree`` recorded since the last call,
        else one all-reduce (a collective: every rank must call it at the same step)."""
        if self._agreed is not None:
            agreed, self._agreed = self._agreed, None
            return agreed
        return all_reduce_max(self.local_flag()) > 0
