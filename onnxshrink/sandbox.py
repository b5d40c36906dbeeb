"""onnxsim in a child process: a crash or a memory blow-up there costs a pass, not the compiler.

One worker (``python -m onnxshrink.sandbox``) is started on first use and kept for later calls,
so onnxsim is imported once per process, as it was in-process. A request is one JSON line on
its stdin -- the model file to read, the file to write, the folding threshold, an address-space
limit (the soft ``RLIMIT_AS``, set per request) -- and the answer one JSON line on its stdout.
A worker that dies (onnxsim's SIGSEGV on a 10^5-fold Tile) or does not answer in time is
killed, the call raises :class:`SandboxCrash`, and the next call starts a new worker. A plain
subprocess, not :mod:`multiprocessing`: spawning would re-run the caller's unguarded script.
"""

from __future__ import annotations

import json
import subprocess
import sys
import tempfile
import threading

__all__ = ["SandboxCrash", "simplify_file", "stop"]


class SandboxCrash(RuntimeError):
    """The worker died or did not answer in time."""


_WORKER: subprocess.Popen | None = None
_LOG: tempfile._TemporaryFileWrapper | None = None  # the worker's stderr, for the crash reason
_LOCK = threading.Lock()


def _start() -> subprocess.Popen:
    global _WORKER, _LOG
    if _WORKER is None or _WORKER.poll() is not None:
        _LOG = tempfile.TemporaryFile(mode="w+", prefix="onnxshrink-sandbox-")
        _WORKER = subprocess.Popen(
            [sys.executable, "-m", "onnxshrink.sandbox"],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=_LOG,
            text=True,
            bufsize=1,
        )
    return _WORKER


def stop() -> None:
    """Kills the worker (a new one starts on the next call)."""
    global _WORKER
    if _WORKER is not None:
        _WORKER.kill()
        _WORKER.wait()
        _WORKER = None


def _last_words() -> str:
    if _LOG is None:
        return ""
    _LOG.seek(0)
    lines = [line.strip() for line in _LOG.read().splitlines() if line.strip()]
    return f": {lines[-1][:200]}" if lines else ""


def simplify_file(src: str, dst: str, fold: str, limit: int, timeout: float) -> bool:
    """onnxsim on the model file ``src``, written to ``dst``; its self-check result. Raises
    :class:`SandboxCrash`, or RuntimeError with onnxsim's own message."""
    with _LOCK:
        worker = _start()
        answer: list[str] = []
        try:
            worker.stdin.write(
                json.dumps({"src": src, "dst": dst, "fold": fold, "limit": limit}) + "\n"
            )
            worker.stdin.flush()
        except OSError as e:
            stop()
            raise SandboxCrash(f"onnxsim's process is gone{_last_words()}") from e
        reader = threading.Thread(
            target=lambda: answer.append(worker.stdout.readline()), daemon=True
        )
        reader.start()
        reader.join(timeout)
        if reader.is_alive():
            stop()
            raise SandboxCrash(f"onnxsim did not finish within {timeout:.0f} s")
        if not answer or not answer[0]:
            code = worker.wait()
            stop()
            raise SandboxCrash(
                f"onnxsim crashed (exit status {code}, memory limit {limit >> 20:,} MiB)"
                f"{_last_words()}"
            )
        reply = json.loads(answer[0])
        if "error" in reply:
            raise RuntimeError(reply["error"])
        return bool(reply["ok"])


def _serve() -> None:
    """The worker's loop: one request per stdin line, one answer per stdout line."""
    import onnx
    import onnxsim

    try:
        import resource
    except ImportError:  # Windows: no address-space limit
        resource = None
    for line in sys.stdin:
        req = json.loads(line)
        if resource is not None:  # the soft limit only: a later request may raise it again
            hard = resource.getrlimit(resource.RLIMIT_AS)[1]
            soft = req["limit"] if hard == resource.RLIM_INFINITY else min(req["limit"], hard)
            resource.setrlimit(resource.RLIMIT_AS, (soft, hard))
        try:
            out, ok = onnxsim.simplify(
                onnx.load(req["src"]), skip_fuse_bn=True, tensor_size_threshold=req["fold"]
            )
            if ok:
                onnx.save(out, req["dst"])
            reply = {"ok": bool(ok)}
        except Exception as e:  # onnxsim's own failure: its message goes back
            reply = {"error": f"{type(e).__name__}: {' '.join(str(e).split())[:1000]}"}
        del req
        sys.stdout.write(json.dumps(reply) + "\n")
        sys.stdout.flush()


if __name__ == "__main__":
    _serve()
