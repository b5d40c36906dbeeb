"""onnxruntime sessions: opened by path (so external data works), run on a dataset, timed.

Reference runs use ``ORT_DISABLE_ALL``: with optimizations on, onnxruntime fuses Conv+BN and
similar patterns itself and would hide a rewrite's numerical bugs. Latency runs use the default
(full) optimizations, as a deployed model would.
"""

from __future__ import annotations

import logging
import os
import random
import statistics
import time
from collections.abc import Mapping
from pathlib import Path

import numpy as np

from onnxshrink.data import Dataset
from onnxshrink.timing import phase, timed

__all__ = ["Outputs", "RunTimeout", "bounded", "latency", "run", "session"]

logger = logging.getLogger(__name__)

# Outputs of a model on a dataset: one dict (output name -> array) per batch, in data order.
Outputs = list[dict[str, np.ndarray]]

DEFAULT_THREADS: int | None = None  # intra-op threads when a call gives none (None: onnxruntime's)


@timed("onnxruntime: open a session")
def session(
    path: str | os.PathLike | bytes,
    *,
    optimize: bool = False,
    threads: int | None = None,
    spin: bool = True,
    shared_arena: bool = False,
    weights_folder: str | None = None,
):
    """An ``InferenceSession`` on CPU; graph optimizations off unless ``optimize``.

    ``spin=False`` stops idle worker threads from spinning: needed when several sessions are
    timed interleaved, or the idle sessions' spinning threads steal the cores of the one
    running (seen here: 2-thread runs 4× slower than 1-thread ones). ``shared_arena``: the
    session allocates from one arena kept for the whole process (onnxruntime's environment
    allocator), for many short sessions one after the other: each would otherwise map fresh
    memory for its own arena and page-fault it in (a MobileNetV2 sweep: 2.7 -> 1.3 s).
    ``weights_folder``: where a serialized model's external data files are (onnxruntime reads
    them from there itself, as it does beside a model opened by path).
    """
    import onnxruntime as ort

    opts = ort.SessionOptions()
    if not spin:
        opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
    # errors reach the user as one line from the exception; onnxruntime's own log would add a
    # second (coloured) line on stderr
    opts.log_severity_level = 4
    if shared_arena:
        _register_shared_arena()
        opts.add_session_config_entry("session.use_env_allocators", "1")
    opts.graph_optimization_level = (
        ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        if optimize
        else ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    )
    if weights_folder is not None:
        opts.add_session_config_entry(
            "session.model_external_initializers_file_folder_path", weights_folder
        )
    threads = threads or DEFAULT_THREADS
    if threads:
        opts.intra_op_num_threads = threads
        opts.inter_op_num_threads = 1
    source = path if isinstance(path, bytes) else str(Path(path))  # bytes: a serialized model
    return ort.InferenceSession(source, opts, providers=["CPUExecutionProvider"])


_shared_arena = False


def _register_shared_arena() -> None:
    """Registers the CPU arena that ``shared_arena`` sessions use, once per process."""
    global _shared_arena
    if _shared_arena:
        return
    import onnxruntime as ort

    info = ort.OrtMemoryInfo(
        "Cpu", ort.OrtAllocatorType.ORT_ARENA_ALLOCATOR, 0, ort.OrtMemType.DEFAULT
    )
    ort.create_and_register_allocator(info, None)
    _shared_arena = True


class RunTimeout(Exception):
    """A run took longer than its bound and was stopped (onnxruntime's terminate flag)."""


def run(
    sess, data: Dataset, *, limit: int | None = None, on_batch=None, timeout: float | None = None
) -> Outputs:
    """Runs ``sess`` on the first ``limit`` samples of ``data``; returns outputs per batch.

    ``timeout``: seconds a batch may take; past it onnxruntime stops between two nodes (a Loop
    of 10^12 iterations too) and :class:`RunTimeout` is raised.
    """
    names = [o.name for o in sess.get_outputs()]
    outputs: Outputs = []
    for feed in data.batches(limit):
        with phase("onnxruntime: run"):
            values = (
                sess.run(names, feed) if timeout is None else bounded(sess, names, feed, timeout)
            )
        outputs.append({n: np.asarray(v) for n, v in zip(names, values)})
        if on_batch is not None:
            on_batch(next(iter(feed.values())).shape[0] if not data.per_sample_batch else 1)
    return outputs


def bounded(sess, names, feed, timeout: float, options=None, bound: float | None = None):
    """``sess.run`` stopped after ``timeout`` seconds (:class:`RunTimeout`); ``options``, the
    run's own ``RunOptions`` if it has some; ``bound``, the batch's whole bound when ``timeout``
    is what is left of it (a batch run one segment at a time), for the message."""
    import threading

    import onnxruntime as ort

    options = options or ort.RunOptions()
    said = f"a batch took longer than {timeout if bound is None else bound:.0f} s and was stopped"
    if timeout <= 0:
        raise RunTimeout(said)
    timer = threading.Timer(timeout, lambda: setattr(options, "terminate", True))
    timer.start()
    try:
        return sess.run(names, feed, options)
    except Exception as e:
        if options.terminate:
            raise RunTimeout(said) from e
        raise
    finally:
        timer.cancel()


def latency(
    sessions: Mapping[str, object],
    feed: Mapping[str, np.ndarray],
    *,
    runs: int = 30,
    warmup: int = 5,
) -> dict[str, float]:
    """Median latency in ms of each session on ``feed``, measured interleaved in one loop.

    Interleaving spreads machine noise evenly over the models compared, and the order is
    shuffled every round (seeded): a session run right after a larger model pays for the caches
    that model evicted (docs/design.md), so a fixed (or merely rotated: same predecessor every
    time) order favours whoever never follows a big one.
    """
    names = {k: [o.name for o in s.get_outputs()] for k, s in sessions.items()}
    for _ in range(warmup):
        for k, s in sessions.items():
            s.run(names[k], dict(feed))
    times: dict[str, list[float]] = {k: [] for k in sessions}
    order = list(sessions)
    rng = random.Random(0)
    for _ in range(runs):
        rng.shuffle(order)
        for k in order:
            s = sessions[k]
            t0 = time.perf_counter()
            s.run(names[k], dict(feed))
            times[k].append((time.perf_counter() - t0) * 1e3)
    return {k: statistics.median(v) for k, v in times.items()}
