"""`satml-ray-serve`: the same FastAPI app on Ray Serve replicas, for more traffic than one process serves.

Each replica is a Ray actor that builds the unchanged app (`app.main.create_app`: registry, batching worker,
attack pool, its lifespan run by Serve) from `SATML_*` variables shipped in the replica's `runtime_env`, so
a replica on another node of the cluster sees the same settings as one on this machine. Serve's HTTP proxy
routes to the replicas and restarts a replica whose process died or whose health check (the app's own
readiness, `/health/ready`) fails. Batching stays our worker's, inside each replica: Serve's `@serve.batch`
would batch a second time in front of it.

One machine: `satml-ray-serve --replicas 2` starts a local Ray cluster. Several: `ray start --head` on one,
`ray start --address HEAD:6379` on the others, then `satml-ray-serve --address auto --replicas N` on any of
them. `--min-replicas/--max-replicas` turn on Serve's autoscaling on ongoing requests per replica.
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
import sys
import threading
from typing import Any

from app.config import Settings
from app.logs import configure_logging, fields
from app.serve import FLAGS

log = logging.getLogger("app.ray_serve")

APP_NAME = "satml"
DEPLOYMENT = "Replica"
PROC_TITLE = f"ServeReplica:{APP_NAME}:{DEPLOYMENT}"  # what `ps` shows for a replica process (Ray's naming)
# everything except the process-level flags, which Serve's proxy owns (host, port) or Ray replaces (workers)
REPLICA_FLAGS = tuple(f for f in FLAGS if f not in ("host", "port", "workers"))


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="satml-ray-serve", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--address", help="Ray cluster to join ('auto': the one `ray start` runs here, or "
                   "HOST:PORT); default: start a local one")
    p.add_argument("--replicas", type=int, default=1, help="fixed number of replicas (default 1)")
    p.add_argument("--min-replicas", type=int, help="autoscaling: fewest replicas (with --max-replicas)")
    p.add_argument("--max-replicas", type=int, help="autoscaling: most replicas")
    p.add_argument("--target-ongoing-requests", type=float, default=16.0,
                   help="autoscaling: requests in progress per replica Serve aims for (default 16)")
    p.add_argument("--cpus-per-replica", type=float, default=1.0,
                   help="CPUs Ray reserves per replica; also its torch/onnxruntime threads unless "
                   "SATML_COMPUTE_THREADS is set (default 1)")
    p.add_argument("--gpus-per-replica", type=float, default=0.0, help="GPUs per replica (default 0)")
    p.add_argument("--host", help="address of Serve's HTTP proxy (SATML_HOST, default 127.0.0.1)")
    p.add_argument("--port", type=int, help="port of Serve's HTTP proxy (SATML_PORT, default 8000)")
    p.add_argument("--artifacts-dir", help="folder of model artifacts (SATML_ARTIFACTS_DIR), read on every node")
    p.add_argument("--default-model", help="SATML_DEFAULT_MODEL")
    p.add_argument("--device", choices=["auto", "cpu", "cuda"], help="SATML_DEVICE")
    p.add_argument("--runtime", choices=["auto", "torch", "onnxruntime"], help="SATML_RUNTIME")
    p.add_argument("--index", choices=["auto", "faiss-cpu", "faiss-gpu", "torch"], help="SATML_INDEX")
    p.add_argument("--log-level", choices=["critical", "error", "warning", "info", "debug"], help="SATML_LOG_LEVEL")
    args = p.parse_args(argv)
    if (args.min_replicas is None) != (args.max_replicas is None):
        p.error("--min-replicas and --max-replicas go together")
    if args.replicas < 1 or (args.min_replicas is not None and not 0 <= args.min_replicas <= args.max_replicas):
        p.error("need --replicas >= 1 and 0 <= --min-replicas <= --max-replicas")
    if args.cpus_per_replica <= 0 or args.gpus_per_replica < 0:
        p.error("--cpus-per-replica must be > 0 and --gpus-per-replica >= 0")
    return args


def replica_env(args: argparse.Namespace, environ: dict[str, str] | None = None) -> dict[str, str]:
    """The SATML_* variables every replica starts with: this process's, then the flags (which win); the
    compute threads follow the CPUs Ray reserves, so N replicas on N cores do not oversubscribe them."""
    env = {k: v for k, v in (os.environ if environ is None else environ).items() if k.startswith("SATML_")}
    for key in REPLICA_FLAGS:
        if (value := getattr(args, key, None)) is not None:
            env[f"SATML_{key.upper()}"] = str(value)
    env.setdefault("SATML_COMPUTE_THREADS", str(max(1, round(args.cpus_per_replica))))
    env.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # as satml-serve: torch's and faiss's pools must not spin
    return env


def deployment_options(args: argparse.Namespace, settings: Settings, env: dict[str, str]) -> dict[str, Any]:
    """Serve deployment options: replica count or autoscaling, resources, health checks, concurrency."""
    options: dict[str, Any] = {
        "name": DEPLOYMENT,
        "ray_actor_options": {"num_cpus": args.cpus_per_replica, "num_gpus": args.gpus_per_replica,
                              "runtime_env": {"env_vars": env}},
        # our batching worker wants many requests in flight (Serve's default, 5, would starve a batch); the app
        # sheds beyond this itself (429/503 + Retry-After)
        "max_ongoing_requests": settings.max_concurrent_requests,
        "health_check_period_s": 5.0,
        "health_check_timeout_s": max(10.0, settings.request_timeout_s),
        "graceful_shutdown_timeout_s": settings.shutdown_grace_s,
    }
    if args.min_replicas is None:
        options["num_replicas"] = args.replicas
    else:
        options["autoscaling_config"] = {"min_replicas": args.min_replicas, "max_replicas": args.max_replicas,
                                         "target_ongoing_requests": args.target_ongoing_requests}
    return options


def build_application(args: argparse.Namespace, settings: Settings) -> Any:
    """The Serve application (imports ray only here: `satml-serve` users need not install it)."""
    from ray import serve

    def make_app() -> Any:  # runs in each replica, after its runtime_env set the SATML_* variables
        from app.main import create_app

        replica_settings = Settings()
        configure_logging(replica_settings.log_level)
        return create_app(replica_settings)

    @serve.ingress(make_app)
    class Replica:
        """One replica: the app, plus Serve's health check wired to the app's readiness."""

        app: Any  # set by Serve's ASGI wrapper

        async def check_health(self) -> None:
            from app.routes.health import readiness

            problem = readiness(self.app)[1]
            if problem is not None:  # Serve replaces a replica that keeps failing this
                raise RuntimeError(f"not ready: {problem}")

    env = replica_env(args)
    return serve.deployment(**deployment_options(args, settings, env))(Replica).bind()


def main(argv: list[str] | None = None) -> None:
    """Start (or join) Ray, start Serve's proxy on --host/--port, run the app until interrupted."""
    args = parse_args(argv)
    overrides = {k: v for k in FLAGS if (v := getattr(args, k, None)) is not None}
    try:
        settings = Settings(**overrides)
    except ValueError as e:
        sys.exit(f"satml-ray-serve: invalid settings:\n{e}")
    try:
        import ray
        from ray import serve
    except ImportError:
        sys.exit("satml-ray-serve: Ray Serve is not installed: pip install -e '.[ray]'")
    configure_logging(settings.log_level)
    ray.init(address=args.address, include_dashboard=False, log_to_driver=True)
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):  # either ends the app cleanly (Ray's processes too); after
        signal.signal(sig, lambda *_: stop.set())  # ray.init, whose own SIGTERM handler would exit at once
    serve.start(http_options={"host": settings.host, "port": settings.port})
    serve.run(build_application(args, settings), name=APP_NAME, route_prefix="/")  # returns once running
    scale = (f"{args.replicas} replica(s)" if args.min_replicas is None
             else f"{args.min_replicas}..{args.max_replicas} replicas (autoscaling)")
    log.info("serving on http://%s:%d with %s", settings.host, settings.port, scale,
             extra=fields(event="ray_serve_started", host=settings.host, port=settings.port))
    stop.wait()
    log.info("stopping", extra=fields(event="ray_serve_stopping"))
    if args.address is None:  # our own local cluster: take it down whole
        serve.shutdown()
    else:  # a shared cluster: remove only our app
        serve.delete(APP_NAME)
    ray.shutdown()


if __name__ == "__main__":
    main()
