"""The sensitivity candidates measured on every core: independent, so one process each.

Candidates already in the cache are read here (they cost nothing); the others go, in the order
given, to ``workers`` child processes (``python -m onnxshrink.target.pool``: nothing of the
caller's ``__main__`` is re-run), each with its own
:class:`~onnxshrink.target.candidates.Sensitivity` of the model (written once, read by each)
on the first 2 × ``samples`` calibration samples, and one onnxruntime and BLAS thread: half of a
measurement is single-threaded Python (the pass, shape inference, writing), so two
one-thread processes beat one two-thread process. Messages are pickles over the children's
stdin/stdout. A new candidate starts only before ``stop_at`` (``time.monotonic()``); results
come back in the order given. Few candidates to measure, one core, a model over ``MAX_BYTES``
(a copy per worker) or a child that fails: measured here, one after the other.
"""

from __future__ import annotations

import logging
import os
import pickle
import selectors
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

from onnxshrink.target.candidates import Candidate, Sensitivity

__all__ = ["MIN_POOLED", "measure_all"]

logger = logging.getLogger(__name__)

MIN_POOLED = 8  # fewer candidates to measure than this: a pool's start-up (~3 s) is not worth it
MAX_BYTES = 256 << 20  # a larger model is measured here: each worker holds its own copy
_ONE_THREAD = {"OMP_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}


def measure_all(
    sens: Sensitivity,
    todo: list[Candidate],
    model_path: Path,
    stop_at: float,
    done: Callable[[], None],
    workers: int | None = None,
) -> list[Candidate]:
    """``todo`` measured (a prefix of it when ``stop_at`` passes), in order; ``done()`` after
    each. ``model_path``: ``sens.model`` as written."""
    workers = min(2, os.cpu_count() or 1) if workers is None else workers
    fresh = [c for c in todo if sens.cached(c) is None]
    if workers < 2 or len(fresh) < MIN_POOLED or (sens.stats.bytes or 0) > MAX_BYTES:
        return _here(sens, todo, stop_at, done)
    results: dict[int, Candidate] = {}
    queue = list(enumerate(todo))[::-1]  # popped from the end: in order
    try:
        children = [_Child() for _ in range(workers)]  # all started before any is fed
    except OSError as e:
        logger.debug("no sensitivity workers: %s", e)
        return _here(sens, todo, stop_at, done)
    setup = (str(model_path), sens.data.subset(slice(0, 2 * sens.samples)), str(sens.workdir))
    setup += (sens.samples, sens.shapes, sens.times, sens.cache, sens.key)
    busy: dict[_Child, int] = {}
    sel = selectors.DefaultSelector()
    try:
        for child in children:
            child.send(setup)
        while queue or busy:
            for child in children:
                while queue and child not in busy and child.alive:
                    i, c = queue[-1]
                    if (hit := sens.cached(c)) is not None:
                        results[i] = hit
                        queue.pop()
                        done()
                    elif time.monotonic() > stop_at:
                        queue.clear()
                    else:
                        queue.pop()
                        child.send(c)
                        busy[child] = i
                        sel.register(child.out, selectors.EVENT_READ, child)
            if not busy:  # every child gone (or nothing left): the rest here
                rest = queue[::-1]
                measured = _here(sens, [c for _, c in rest], stop_at, done)
                results.update(zip([i for i, _ in rest], measured))
                break
            for key, _ in sel.select():
                child = key.data
                sel.unregister(child.out)
                i = busy.pop(child)
                got = child.receive()
                results[i] = got if got is not None else sens.measure(todo[i])
                done()
    finally:
        for child in children:
            child.close()
    return [results[i] for i in sorted(results)]


def _here(sens, todo, stop_at, done) -> list[Candidate]:
    out = []
    for c in todo:
        if time.monotonic() > stop_at and sens.cached(c) is None:
            break
        out.append(sens.measure(c))
        done()
    return out


class _Child:
    """One worker process: a candidate in, the measured candidate (or None: it failed) out."""

    def __init__(self) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "onnxshrink.target.pool"],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,
            env={**os.environ, **_ONE_THREAD},
        )
        self.out = self.proc.stdout
        self.alive = True

    def send(self, obj) -> None:
        """The set-up first, then one candidate at a time."""
        try:
            pickle.dump(obj, self.proc.stdin, protocol=pickle.HIGHEST_PROTOCOL)
            self.proc.stdin.flush()
        except OSError as e:
            logger.debug("sensitivity worker gone: %s", e)
            self.alive = False

    def receive(self) -> Candidate | None:
        try:
            got = pickle.load(self.out)
        except Exception as e:  # the child died: measured here instead
            logger.debug("sensitivity worker failed: %s", e)
            self.alive = False
            return None
        if isinstance(got, str):  # an error the child caught
            logger.debug("sensitivity worker: %s", got)
            return None
        return got

    def close(self) -> None:
        self.proc.kill()
        self.proc.wait()


def _serve() -> None:
    """The child's loop: the set-up, then one candidate after another until stdin closes."""
    import tempfile

    from onnxshrink import io, runtime

    out = os.fdopen(os.dup(1), "wb")
    os.dup2(2, 1)  # anything printed goes to stderr, never into the replies
    stdin = sys.stdin.buffer
    path, data, workdir, samples, shapes, times, cache, key = pickle.load(stdin)
    runtime.DEFAULT_THREADS = 1
    own = Path(tempfile.mkdtemp(prefix="worker", dir=workdir))
    sens = Sensitivity(io.load(path).model, data, own, samples, shapes, times, cache)
    sens.key = key  # the caller's: the model as written may serialize differently
    while True:
        try:
            c = pickle.load(stdin)
        except EOFError:
            return
        try:
            reply: Candidate | str = sens.measure(c)
        except Exception as e:
            reply = f"{type(e).__name__}: {e}"
        pickle.dump(reply, out, protocol=pickle.HIGHEST_PROTOCOL)
        out.flush()


if __name__ == "__main__":
    _serve()
