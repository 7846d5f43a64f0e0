"""`satml-serve`: run the API with uvicorn (`--workers auto`: two processes on a 2-core CPU-only host, else one;
one per GPU if you have several).

Every option defaults to its `SATML_*` environment variable (see `app.config.Settings`); a flag
given here wins over the environment.
"""

from __future__ import annotations

import argparse
import logging
import math
import os
import shutil
import socket
import sys
import tempfile
from pathlib import Path
from typing import Any

from app.config import Settings
from app.metrics import MULTIPROC_DIR_ENV

FLAGS = ("host", "port", "artifacts_dir", "default_model", "device", "runtime", "index", "log_level", "workers")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="satml-serve", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--host", help="bind address (SATML_HOST, default 127.0.0.1; 0.0.0.0 in a container)")
    p.add_argument("--port", type=int, help="TCP port (SATML_PORT, default 8000)")
    p.add_argument("--artifacts-dir", help="folder of model artifacts (SATML_ARTIFACTS_DIR, default artifacts)")
    p.add_argument("--default-model", help="model used when a request names none (SATML_DEFAULT_MODEL)")
    p.add_argument("--device", choices=["auto", "cpu", "cuda"], help="SATML_DEVICE, default auto")
    p.add_argument("--runtime", choices=["torch", "onnxruntime"], help="SATML_RUNTIME, default torch")
    p.add_argument("--index", choices=["auto", "faiss-cpu", "faiss-gpu", "torch"], help="SATML_INDEX, default auto")
    p.add_argument("--log-level", choices=["critical", "error", "warning", "info", "debug"],
                   help="SATML_LOG_LEVEL, default info")
    p.add_argument("--workers", type=_workers_arg, help="uvicorn worker processes, each with its own model copies, "
                   "or auto (SATML_WORKERS, default auto: 2 on a CPU-only host with 2 cores, else 1)")
    return p.parse_args(argv)


def _workers_arg(value: str) -> int | str:
    return value if value == "auto" else int(value)


def nvidia_driver_present() -> bool:
    """Whether this host (or container) sees an NVIDIA driver, without importing torch (the `--workers` master
    never does): the driver's control device or its /proc entry."""
    return Path("/dev/nvidiactl").exists() or Path("/proc/driver/nvidia/version").exists()


def auto_workers(settings: Settings, cpu_count: int, gpu: bool) -> int:
    """`workers=auto`: how many processes `satml-serve` starts. Two on a CPU-only host with exactly 2 cores, where
    two processes batching on their event loops measured best (benchmarks/README.md: 1 image x 32 connections
    1.3x one process's img/s, p99 40.6 vs 59.6 ms; memory 2.2 GiB vs 1.1 GiB for the four shipped models). One
    where a second process cannot help or was not measured: live bank updates (`state_dir`, one bank per
    process), a GPU (`device` cuda, or auto with a driver present: one process batches for the card), one core,
    and more than 2 cores (each loaded batch would get one thread: set SATML_WORKERS and
    SATML_COMPUTE_THREADS for such a host)."""
    if settings.state_dir is not None or settings.device == "cuda" or (settings.device == "auto" and gpu):
        return 1
    return 2 if cpu_count == 2 else 1


def graceful_timeout(settings: Settings) -> int:
    """uvicorn's timeout_graceful_shutdown (whole seconds): how long SIGTERM waits for in-flight requests."""
    return max(1, math.ceil(settings.shutdown_grace_s))


def main(argv: list[str] | None = None) -> None:
    """Parse flags, build the settings, start uvicorn with the app factory's app."""
    args = parse_args(argv)
    overrides = {k: v for k in FLAGS if (v := getattr(args, k)) is not None}
    try:
        settings = Settings(**overrides)
    except ValueError as e:  # pydantic's ValidationError, or SettingsError for an unparsable env value
        sys.exit(f"satml-serve: invalid settings:\n{e}")

    # torch and faiss each bring an OpenMP pool; spinning waits make them fight over the cores
    # (measured in benchmarks/README.md). Must be set before torch is imported; the user's value wins.
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    import uvicorn

    from app.logs import configure_logging

    configure_logging(settings.log_level)
    if settings.workers == "auto":
        cores, gpu = os.cpu_count() or 1, nvidia_driver_present()
        overrides["workers"] = workers = auto_workers(settings, cores, gpu)
        settings = settings.model_copy(update={"workers": workers})
        logging.getLogger("app.serve").info(
            "workers auto: %d process%s (%d cores, %s, state_dir %s)", workers, "" if workers == 1 else "es", cores,
            "NVIDIA driver" if gpu else "no GPU", "set" if settings.state_dir else "unset")
    common: dict[str, Any] = dict(host=settings.host, port=settings.port, log_level=settings.log_level,
                                  log_config=None, access_log=False, proxy_headers=False,
                                  timeout_graceful_shutdown=graceful_timeout(settings))
    if settings.processes() == 1:
        from app.main import create_app

        uvicorn.run(create_app(settings), **common)
        return
    # the supervising process never imports the app (torch, the models): only the workers do
    # several processes: each builds its app from the environment, so the flags travel as SATML_* variables
    for key in FLAGS:
        if key in overrides:
            os.environ[f"SATML_{key.upper()}"] = str(overrides[key])
    # /metrics answers for every process (app.metrics), through a folder of per-process files: ours, removed at
    # exit, unless the operator named one (theirs to empty between runs, as prometheus_client asks)
    own_dir = None
    if not os.environ.get(MULTIPROC_DIR_ENV):
        own_dir = os.environ[MULTIPROC_DIR_ENV] = tempfile.mkdtemp(prefix="satml-metrics-")
    try:
        if settings.reuse_port and hasattr(socket, "SO_REUSEPORT"):
            config = uvicorn.Config("app.serve:worker_app", factory=True, workers=settings.processes(), **common)
            reuse_port_supervisor(config).run()
        else:
            uvicorn.run("app.serve:worker_app", factory=True, workers=settings.processes(), **common)
    finally:
        if own_dir is not None:
            shutil.rmtree(own_dir, ignore_errors=True)


def address_family(host: str) -> socket.AddressFamily:
    """IPv6 for an address with a colon, else IPv4 (as uvicorn's own bind decides)."""
    return socket.AF_INET6 if ":" in host else socket.AF_INET


def reuse_port_socket(host: str, port: int) -> socket.socket:
    """A TCP socket bound to (host, port) with SO_REUSEPORT, inheritable by a worker process; not listening yet
    (the worker's event loop listens on it)."""
    sock = socket.socket(address_family(host), socket.SOCK_STREAM, socket.IPPROTO_TCP)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)  # type: ignore[attr-defined,unused-ignore]
    sock.bind((host, port))
    sock.set_inheritable(True)
    return sock


def reuse_port_supervisor(config: Any) -> Any:
    """uvicorn's worker supervisor (restarts, health pings, signals), but every worker it starts, the first ones and
    each replacement, gets a listening socket of its own on the same port (SO_REUSEPORT) instead of one shared
    socket: on a shared socket the first process to wake accepts all pending connections, and a burst of
    persistent ones (a load balancer's pool, wrk) can land almost all in one process. The kernel's hash split is
    ~binomial; the master keeps no reference to a worker's socket, so a dead worker's socket closes with it."""
    from uvicorn.supervisors.multiprocess import Multiprocess

    probe = socket.socket(address_family(config.host))
    try:  # a plain bind first: SO_REUSEPORT alone would share a port another server of this user holds
        probe.bind((config.host, config.port))
        config.port = probe.getsockname()[1]  # port 0: the one the OS chose, for every worker
    except OSError as e:
        sys.exit(f"satml-serve: cannot bind {config.host}:{config.port}: {e}")
    finally:
        probe.close()
    logging.getLogger("uvicorn.error").info(
        "Uvicorn running on http://%s:%d with a SO_REUSEPORT socket per worker (Press CTRL+C to quit)",
        config.host, config.port)

    class PerWorkerSockets(Multiprocess):
        @property  # read once for each worker uvicorn starts (the first ones and every replacement)
        def sockets(self) -> list[socket.socket]:
            return [reuse_port_socket(config.host, config.port)]

        @sockets.setter
        def sockets(self, value: list[socket.socket]) -> None:
            pass  # uvicorn's own assignment of the shared list

    return PerWorkerSockets(config, sockets=[])


def exit_with_parent() -> None:
    """Linux: have the kernel send this worker SIGTERM (a graceful stop) when the supervisor that started it dies.
    uvicorn's workers otherwise outlive a SIGKILLed or crashed supervisor and keep serving on their own sockets,
    with nobody to restart or stop them. If the supervisor died before the request took hold, stop now."""
    if sys.platform != "linux":
        return
    import ctypes
    import multiprocessing
    import signal

    pr_set_pdeathsig = 1
    ctypes.CDLL(None, use_errno=True).prctl(pr_set_pdeathsig, signal.SIGTERM)
    parent = multiprocessing.parent_process()
    if parent is not None and os.getppid() != parent.pid:
        os.kill(os.getpid(), signal.SIGTERM)


def worker_app() -> Any:
    """The app of one of several worker processes: settings from the environment, logging as `main` sets it."""
    from app.logs import configure_logging
    from app.main import create_app

    exit_with_parent()
    settings = Settings()
    configure_logging(settings.log_level)
    logging.getLogger("uvicorn.access").disabled = True  # as access_log=False does in one process: app.access logs
    return create_app(settings)


if __name__ == "__main__":
    main()
