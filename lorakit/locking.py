"""What a run holds while it runs: the lock on its output folder and the stop-signal handlers.

One run per output folder. A run holds ``--output/.lorakit.lock`` for its lifetime: an
exclusive ``flock`` on it (released by the kernel whatever way the process ends) and, inside,
who holds it (pid, host, start time) for the message a second run gets. A lock file left
behind by a process that no longer holds it (killed, crashed) is taken over with a warning.

SIGINT (Ctrl-C) and SIGTERM (Docker, SLURM, Kubernetes) both become :class:`StopRequested`,
which the loop answers by saving its finished steps (see :class:`RunGuard`).
"""

from __future__ import annotations

import errno
import json
import logging
import os
import signal
import socket
import threading
import time
from contextlib import contextmanager
from pathlib import Path

from lorakit.errors import LorakitError

log = logging.getLogger("lorakit")

LOCK_NAME = ".lorakit.lock"
_UNSUPPORTED = {errno.ENOLCK, errno.EINVAL, getattr(errno, "EOPNOTSUPP", errno.EINVAL),
                getattr(errno, "ENOTSUP", errno.EINVAL)}


def is_main_launch_process() -> bool:
    """Whether this process is rank 0 of its launcher (``accelerate launch``, torchrun, MPI),
    known before any accelerator exists."""
    for var in ("RANK", "OMPI_COMM_WORLD_RANK", "PMI_RANK", "SLURM_PROCID"):
        if os.environ.get(var, "").strip().isdigit():
            return int(os.environ[var]) == 0
    return True


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's live process
        return True
    return True


def _holder(text: str) -> dict:
    try:
        data = json.loads(text)
        return data if isinstance(data, dict) else {}
    except ValueError:
        return {}


def _describe(holder: dict) -> str:
    since = holder.get("since")
    when = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(since)) if isinstance(since, (int, float)) else "?"
    return f"pid {holder.get('pid', '?')} on {holder.get('host', '?')}, since {when}"


def _read(fd: int) -> str:
    os.lseek(fd, 0, os.SEEK_SET)
    return os.read(fd, 4096).decode("utf-8", "replace")


class OutputLock:
    """``OutputLock.acquire(folder)`` or a one-line refusal naming the holder; ``release()``."""

    def __init__(self, path: Path, fd: int):
        self.path, self.fd = path, fd

    @classmethod
    def acquire(cls, folder: Path) -> "OutputLock":
        import fcntl

        folder = Path(folder)
        path = folder / LOCK_NAME
        while True:
            fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError as exc:
                if exc.errno in _UNSUPPORTED:  # a filesystem without locks: trust the file's word
                    cls._refuse_if_live(folder, _holder(_read(fd)), fd)
                    break
                holder = _holder(_read(fd))
                os.close(fd)
                raise LorakitError(
                    f"--output {folder} is in use by another lorakit run ({_describe(holder)}); "
                    "wait for it to finish, stop it, or choose another --output."
                ) from None
            try:  # the lock is on this file; is it still the one at `path` (not removed meanwhile)?
                if os.stat(path).st_ino == os.fstat(fd).st_ino:
                    break
            except FileNotFoundError:
                pass
            os.close(fd)
        previous = _holder(_read(fd))
        if previous.get("pid"):
            dead = previous.get("host") == socket.gethostname() and not _alive(int(previous["pid"]))
            log.warning("--output %s: took over the lock left by %s (%s)", folder, _describe(previous),
                        "that process has ended" if dead else "no longer held")
        me = json.dumps({"pid": os.getpid(), "host": socket.gethostname(), "since": time.time()}).encode()
        os.ftruncate(fd, 0)
        os.pwrite(fd, me, 0)
        os.fsync(fd)
        return cls(path, fd)

    @staticmethod
    def _refuse_if_live(folder: Path, holder: dict, fd: int) -> None:
        pid, host = holder.get("pid"), holder.get("host")
        if pid and pid != os.getpid() and (host != socket.gethostname() or _alive(int(pid))):
            os.close(fd)
            raise LorakitError(f"--output {folder} is in use by another lorakit run ({_describe(holder)}); "
                               "wait for it to finish, stop it, or choose another --output.")

    def release(self) -> None:
        fd, self.fd = self.fd, None
        if fd is None:
            return
        try:
            if os.stat(self.path).st_ino == os.fstat(fd).st_ino:
                os.unlink(self.path)
        except OSError:
            pass
        finally:
            os.close(fd)

    def __del__(self):
        try:
            self.release()
        except Exception:  # interpreter shutdown
            pass


def _importing(frame) -> bool:
    while frame is not None:
        if frame.f_code.co_filename.startswith("<frozen importlib"):
            return True
        frame = frame.f_back
    return False


class StopRequested(KeyboardInterrupt):
    """SIGINT or SIGTERM asked the run to stop; ``exit_code`` is the shell's 128 + signal.
    ``agreed``: every process of a several-process run stops after the same finished step."""

    def __init__(self, signum: int, agreed: bool = False):
        self.signum, self.exit_code, self.agreed = signum, 128 + signum, agreed
        self.summary = f"stopped by {signal.Signals(signum).name}"
        super().__init__(self.summary)


class RunGuard:
    """What a run holds while it runs: the lock on ``--output`` (the launcher's main process
    only) and, in the main thread, SIGINT/SIGTERM handlers; the previous ones come back after.

    A stop request raises :class:`StopRequested` at once, unless ``busy()`` (a weight update)
    or a checkpoint write is in progress: then it waits for :meth:`check` after that.

    With several processes (``together``, the training loop) a request never raises at once:
    a process that left mid-step would leave the others waiting in the step's collective. It
    is recorded (:meth:`request`), sent with the next step's gradient reduction, and every
    process raises after that same step (:meth:`check` with the agreed signal), so one
    process's signal (``kill PID``) stops them all at one finished step."""

    def __init__(self, output_dir: Path):
        self.output_dir = output_dir
        self.lock = None
        self.created = False
        self.previous: dict = {}
        self.received = None  # the first stop request's signal number
        self.raised = False
        self.deferring = self.running = False
        self.together = False  # several processes: stop only where all agreed (the step's reduction)
        self.agreed = 0  # the signal the processes agreed to stop for (0: none yet)
        self.busy = lambda: False

    def lock_output(self) -> None:
        if not is_main_launch_process():
            return
        from lorakit.outputs import check_output_path

        check_output_path(self.output_dir)
        self.created = not self.output_dir.exists()
        self.output_dir.mkdir(parents=True, exist_ok=True)
        self.lock = OutputLock.acquire(self.output_dir)

    def install(self, running: bool = False) -> None:
        """Take SIGINT/SIGTERM (main thread only); ``running``: the loop, which calls :meth:`check`."""
        self.running = running
        if threading.current_thread() is not threading.main_thread() or self.previous:
            return
        for sig in (signal.SIGINT, signal.SIGTERM):
            current = signal.getsignal(sig)
            if current is not signal.SIG_IGN and current is not None:  # (None: set outside Python)
                self.previous[sig] = signal.signal(sig, self._handle)

    def restore(self) -> None:
        for sig, handler in self.previous.items():
            # after several processes agreed to stop this one only ends: torchrun's SIGTERM to the
            # processes still alive once the first has ended must not turn their exit status
            # (130 / 143, the finished steps saved) into a death by signal
            signal.signal(sig, signal.SIG_IGN if self.agreed else handler)
        self.previous = {}

    def close(self) -> None:
        self.restore()
        if self.lock is not None:
            self.lock.release()
            self.lock = None
            if self.created and self.output_dir.is_dir() and not any(self.output_dir.iterdir()):
                self.output_dir.rmdir()  # a run that failed before writing anything leaves no folder

    def _handle(self, signum, frame) -> None:
        name = signal.Signals(signum).name
        if self.received is not None:
            log.warning("%s: already stopping (saving the finished steps); please wait", name)
            return
        self.received = signum
        if self.together and not self.deferring:
            log.warning("%s: all processes stop together after the current step", name)
            return
        if self.deferring or self.busy():
            log.warning("%s: stopping once the current update or checkpoint is written", name)
            return
        if _importing(frame):  # an exception inside an import can leave modules half-initialised
            if self.running:
                return  # the loop's next check() stops the run
            self._exit_now(signum)
        self.check()

    def _exit_now(self, signum: int) -> None:
        """A stop during setup, inside an import: nothing to save yet, so end the process here."""
        import sys

        from lorakit.progress import resume_hint

        if self.lock is not None:
            self.lock.release()
        name = signal.Signals(signum).name
        sys.stderr.write(f"error: stopped by {name} during setup (nothing to save yet); {resume_hint()}.\n")
        sys.stderr.flush()
        os._exit(128 + signum)

    def request(self) -> int:
        """This process's stop request for the next step's reduction: a signal number, 0 for none."""
        return 0 if self.received is None or self.raised else self.received

    def check(self, agreed: int = 0) -> None:
        """Raise :class:`StopRequested` for a pending request; ``together``, only once the
        processes agreed (``agreed``: the signal the step's reduction carried, 0 for none)."""
        if self.together:
            if not agreed or self.raised:
                return
            self.agreed = agreed
            self.received = self.received or agreed
            self.raised = True
            raise StopRequested(agreed, agreed=True)
        if self.received is not None and not self.raised:
            self.raised = True
            raise StopRequested(self.received)

    def stopping(self) -> None:
        """From here on (saving what the interrupted run finished) further requests wait."""
        self.raised = True
        self.received = self.received or signal.SIGINT

    @contextmanager
    def deferred(self):
        self.deferring = True
        try:
            yield
        finally:
            self.deferring = False
        self.check()
