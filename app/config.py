"""Service settings: one typed class, read from `SATML_*` environment variables (DESIGN section 5).

`create_app(Settings(...))` takes an instance, so tests and the CLI pass values directly; the
environment is only the default source. Units are in the field comments.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Literal

from pydantic import Field, SecretStr, field_validator, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

if TYPE_CHECKING:
    from training import knn


MAX_ATTACK_EPS = 16 / 255  # DESIGN section 5: /attack never exceeds this L-inf radius
MAX_ATTACK_STEPS = 100  # DESIGN section 5: nor this many gradient steps
LogLevel = Literal["critical", "error", "warning", "info", "debug"]


class Settings(BaseSettings):
    """Everything the server process needs; env prefix `SATML_` (e.g. `SATML_RUNTIME=onnxruntime`)."""

    model_config = SettingsConfigDict(env_prefix="SATML_", extra="ignore", validate_default=True)

    # models
    artifacts_dir: Path = Path("artifacts")  # every sub-folder with a manifest.json is one model
    default_model: str = "default"  # folder name used when a request names no model
    device: Literal["auto", "cpu", "cuda"] = "auto"  # auto: cuda if available, else cpu
    # encoder runtime for /classify (attacks use torch); auto: onnxruntime on a CPU when the artifact has
    # encoder.onnx and onnxruntime imports (1.4x the img/s of torch under load, benchmarks/results), else torch
    runtime: Literal["auto", "torch", "onnxruntime"] = "auto"
    index: Literal["auto", "faiss-cpu", "faiss-gpu", "torch"] = "auto"  # k-NN backend; auto: best available
    # uvicorn worker processes, each with its own copy of every model (memory x workers; benchmarks/README.md
    # measures what a second process buys on 2 cores); the OS spreads connections over them. auto: `satml-serve`
    # picks (`auto_workers`: 2 on a CPU-only host with 2 cores, the measured case, else 1); an app built any other
    # way (tests, Ray Serve replicas, an embedding program) is one process
    workers: Annotated[int, Field(ge=1, le=64)] | Literal["auto"] = "auto"
    # with workers > 1: each process listens on a socket of its own (SO_REUSEPORT, Linux), so the kernel spreads
    # connections over the processes by a hash of their addresses; off: one shared socket, where the first process
    # to wake accepts every pending connection (wrk's 32 connections split 30/2 in benchmarks/README.md)
    reuse_port: bool = True
    # intra-op threads of torch and onnxruntime in each process; None: torch's default (one per core) with one
    # worker or with loop batching (a lone request gets them all, loaded batches one: `small_batch_limit`), cores /
    # workers with several worker-thread processes (so N processes do not oversubscribe the cores)
    compute_threads: Annotated[int, Field(ge=1, le=256)] | None = None
    # CPU: /classify's batches gathered and run on the event loop itself (app.loop_batching), no thread hop per
    # request; the loop is blocked while a batch runs, so it is for several processes, where the other process
    # keeps the other core busy. auto: on with workers > 1. Paired A/B, 2-core AVX2 VM, 2 processes against the
    # same 2 processes through the batch worker and against 1 process (benchmarks/README.md)
    loop_batching: Literal["auto", "on", "off"] = "auto"
    # on a CPU, while other requests are in progress (app.middleware.InFlight; a lone request gets every thread),
    # a batch of at most this many images runs the model on ONE intra-op thread (0: always all of them):
    # with many small requests the event loop needs a core for the next requests' parsing and decoding while the
    # model runs, and a small batch gains little from a second thread; large batches (many images per request)
    # keep every thread. Idle 2-core A/B at 32 connections: 1 image/request +5 % over the hand-read form alone
    # (1,336 vs 1,271 img/s), 8 images/request unchanged (benchmarks/results/serve_ab_small_batch.md)
    small_batch_max: Annotated[int, Field(ge=0, le=4096)] = 16
    # CPU: a second batch lane per model (batching.BatchWorker's helper) that takes a batch only while the first
    # is busy and at least `second_lane_min_images` images wait; both lanes then run one intra-op thread each.
    # Light load never wakes it. Idle 2-core A/B, 3 rounds (benchmarks/results/serve_ab_lanes.md): 8 images x 32
    # connections 1.09x, 8 x 8 1.06x, 1 x 32 1.01x, 1 x 1 unchanged; a threshold of 17 cost 1 x 32 4 % and its p99
    second_lane: bool = True
    # CPU with onnxruntime and the torch index: the exact k-NN majority vote appended to the encoder's graph
    # (app.fused), one call per batch instead of the encoder then ~10 torch ops, for the bank as shipped (added
    # examples or another vote go through app.index). Same predictions on the default's first 2,000 test images, 3 of
    # 4,480 count rows differing by the product's float rounding. Paired A/B on a 2-core AVX2 VM, 6 rounds
    # (benchmarks/results/serve_ab_fused_paired.md): 1 image x 32 connections 1.12x (6 of 6 pairs above 1),
    # 1 x 1 1.07x, 8 x 32 1.07x
    fused_vote: bool = True
    # with fused_vote: a small batch (<= small_batch_max) with no other request in progress runs on every thread of
    # its own session whose threads busy-wait between ops while it runs and stop when it returns (onnxruntime's
    # force_spinning_stop); a sleeping thread's wake-up per op cost a batch of one 1.27 -> 0.90 ms in process. Under
    # load nothing changes (small batches take the one-thread session, large ones the non-spinning one): spinning
    # there cost 1 x 32 and 8 x 32 ~5 % in a paired A/B, hence only here (benchmarks/README.md)
    lone_spin: bool = True
    second_lane_min_images: Annotated[int, Field(ge=1, le=4096)] = 32
    # the interpreter's GIL switch interval in ms for the server's lifetime (sys.setswitchinterval; None: Python's
    # 5 ms). The event loop, decode threads and the batch worker hand the GIL to each other many times per
    # request, and a thread that wants it waits up to this long. Not a default: 1 ms read 1.08x at 1 image x 32
    # connections in one idle A/B (serve_ab_switch.md) but 0.95x in the next (serve_ab_session6_parts.md)
    switch_interval_ms: Annotated[float, Field(gt=0, le=100)] | None = None
    # once the models are loaded, move every live object to the collector's permanent generation (gc.freeze): a
    # full collection then scans only what was made since, not the ~260,000 objects of torch, faiss and the app
    # (one full collection of those took ~145 ms here beside a training job, and it stops every thread, the event
    # loop included)
    gc_freeze: bool = True
    # k-NN index (training.knn.auto_index_spec): auto picks by bank size, from benchmarks/results/index_types*.md:
    # exact flat up to 200,000 vectors (every shipped bank), ivf_flat above, ivf_pq from 20 M; or one of flat
    # (exact), ivf_flat, ivf_pq, hnsw. An approximate type needs faiss (SATML_INDEX auto then picks faiss-gpu or
    # faiss-cpu, never torch)
    index_type: Literal["auto", "flat", "ivf_flat", "ivf_pq", "hnsw"] = "auto"
    index_nlist: Annotated[int, Field(ge=1)] | None = None  # ivf_*: coarse cells; None: ~4 sqrt(bank size)
    index_nprobe: Annotated[int, Field(ge=1)] | None = None  # ivf_*: cells searched per query; None: nlist / 32
    index_pq_m: Annotated[int, Field(ge=1)] = 16  # ivf_pq: bytes per vector
    index_hnsw_m: Annotated[int, Field(ge=1)] = 32  # hnsw: links per node
    index_ef_search: Annotated[int, Field(ge=1)] = 128  # hnsw: candidates per query
    # abstain (answer "abstained": true) below this conformal credibility; 0: never. Models without calibration
    # scores never abstain and report credibility null. Per request: /classify field min_credibility.
    min_credibility: Annotated[float, Field(ge=0, le=1)] = 0.0
    # k-NN vote of every model: prior (each class's votes x max(1, largest class / (2 x its size)), so a few
    # examples added live can win: benchmarks/results/few_shot.md), majority (the paper's) or capped (no class
    # counts more votes than the bank's smallest class has examples). On a bank whose classes are all at least
    # half the largest (the shipped ones) prior is exactly the majority vote. None (in code): each manifest's knn.vote
    vote: Literal["majority", "capped", "prior"] | None = "prior"

    # live bank updates (POST/GET/DELETE /models/{name}/examples)
    state_dir: Path | None = None  # writable folder for the added examples (overlay per model); None: routes refused
    # without an API key the examples routes are refused unless this opens them (local use only)
    examples_open: bool = False
    examples_max_per_request: Annotated[int, Field(ge=1, le=4096)] = 64  # images in one POST .../examples
    examples_max_per_model: Annotated[int, Field(ge=1, le=1_000_000)] = 10_000  # added examples per model in all

    # dynamic batching (one worker per model)
    max_batch: Annotated[int, Field(ge=1, le=4096)] = 64  # images per forward pass
    # how long the first request of a batch waits for company; 0 (default): continuous batching, an idle
    # worker runs at once and the next batch takes whatever queued while it was busy (as Triton, vLLM)
    max_wait_ms: Annotated[float, Field(ge=0, le=1000)] = 0.0
    request_timeout_s: Annotated[float, Field(gt=0)] = 30.0  # a /classify request waiting longer for its batch gets 503
    max_queue_images: Annotated[int, Field(ge=1)] = 256  # images waiting for a model's batch; more: 429 + Retry-After

    # overload (load shedding: answer 429/503 with Retry-After rather than queue without bound)
    max_concurrent_requests: Annotated[int, Field(ge=1)] = 64  # POST requests in progress; more get 503 at once
    decode_slots: Annotated[int, Field(ge=1, le=256)] | None = None  # images decoded at once; None: max(2, CPUs)
    decode_wait_s: Annotated[float, Field(gt=0)] = 2.0  # longest wait for a decode slot, then 503 + Retry-After

    # uploads
    max_upload_bytes: Annotated[int, Field(ge=1024)] = 10 * 1024 * 1024  # whole request body, all files together
    max_files_per_request: Annotated[int, Field(ge=1, le=4096)] = 64  # files in one /classify request
    max_pixels: Annotated[int, Field(ge=1)] = 40_000_000  # width * height of one decoded image (bomb guard)
    # sum of width * height over the images of one request, checked from the headers before decoding (413)
    max_request_pixels: Annotated[int, Field(ge=1)] = 100_000_000

    # /attack
    attack_max_eps: Annotated[float, Field(gt=0)] = MAX_ATTACK_EPS  # L-inf radius in [0, 1] pixel units
    attack_max_steps: Annotated[int, Field(ge=1)] = MAX_ATTACK_STEPS  # gradient steps
    attack_concurrency: Annotated[int, Field(ge=1, le=64)] = 1  # attacks running at once
    attack_queue: Annotated[int, Field(ge=0, le=1024)] = 8  # attacks waiting beyond those; more get 429
    attack_timeout_s: Annotated[float, Field(gt=0)] = 30.0  # queue wait + run time of one /attack request

    # /certify (randomized smoothing, Cohen et al. 2019): n0 + n noisy copies go through the model's batching
    # worker in chunks of certify_chunk images (None: max_batch; capped at max_batch), interleaved with
    # /classify batches, on a pool of their own. A /classify request arriving mid-chunk waits for that chunk: 32
    # against 64 cut /classify's p99 beside /certify by a third at 1 and 8 connections for ~3 % more time per
    # certificate (interleaved A/B); 16 cut 1-connection req/s 6x (benchmarks/README.md)
    certify_chunk: Annotated[int, Field(ge=1, le=4096)] | None = 32
    certify_max_n: Annotated[int, Field(ge=1, le=1_000_000)] = 10_000  # estimation samples per request
    certify_max_n0: Annotated[int, Field(ge=1, le=100_000)] = 1_000  # selection samples per request
    certify_max_sigma: Annotated[float, Field(gt=0, le=4)] = 1.0  # noise std, [0, 1] pixel units
    certify_concurrency: Annotated[int, Field(ge=1, le=64)] = 1  # certifications running at once
    certify_queue: Annotated[int, Field(ge=0, le=1024)] = 4  # certifications waiting beyond those; more get 429
    certify_timeout_s: Annotated[float, Field(gt=0)] = 60.0  # queue wait + run time of one /certify request

    # access and process
    api_key: SecretStr | None = None  # when set, header X-API-Key must match for /attack, /certify, .../examples
    cors_origins: list[str] = []  # allowed browser origins (JSON list in the env var); empty: CORS closed
    host: str = "127.0.0.1"
    port: Annotated[int, Field(ge=0, le=65535)] = 8000  # 0: any free port
    log_level: LogLevel = "info"
    # FastAPI's native OpenTelemetry through globally configured providers (FastAPI >= 0.160); off: its per-request
    # provider look-ups cost ~4 % of the event loop under load, and /metrics is Prometheus
    otel: bool = False
    # SIGTERM: in-flight requests get this long, then are cut and the process exits; keep it below the
    # orchestrator's kill timeout (compose stop_grace_period: 20 s)
    shutdown_grace_s: Annotated[float, Field(gt=0, le=300)] = 15.0

    def processes(self) -> int:
        """The worker processes this app is one of: `workers`, with `auto` read as 1 (`satml-serve` resolves auto
        before it starts several, and passes the number on to each)."""
        return 1 if self.workers == "auto" else self.workers

    def batches_on_loop(self) -> bool:
        """Whether CPU models batch on the event loop (`loop_batching`; auto: with several worker processes)."""
        return self.loop_batching == "on" or (self.loop_batching == "auto" and self.processes() > 1)

    def threads_per_process(self) -> int | None:
        """The intra-op thread count to set in each serving process (None: leave torch's default)."""
        if self.compute_threads is not None:
            return self.compute_threads
        if self.batches_on_loop():
            return None  # every core for a lone request; loaded batches take one (small_batch_limit)
        n = self.processes()
        return max(1, (os.cpu_count() or 1) // n) if n > 1 else None

    def small_batch_limit(self) -> int:
        """Batches up to this size run on one intra-op thread while other requests are in progress: with loop
        batching every batch (the loop, or another process, needs the other core), else `small_batch_max`."""
        return max(self.small_batch_max, self.max_batch) if self.batches_on_loop() else self.small_batch_max

    def index_spec(self, bank_size: int, dim: int) -> knn.IndexSpec:
        """The index for a bank of `bank_size` vectors of `dim` dimensions (auto type and IVF sizes resolved)."""
        from training import knn  # here, not at the top: the settings must not import torch (the --workers master)

        return knn.auto_index_spec(bank_size, dim, self.index_nlist, self.index_nprobe, self.index_pq_m,
                                   self.index_hnsw_m, self.index_ef_search, self.index_type)

    @field_validator("log_level", mode="before")
    @classmethod
    def _lower_level(cls, v: object) -> object:
        return v.lower() if isinstance(v, str) else v

    @field_validator("api_key", mode="before")
    @classmethod
    def _empty_key_is_none(cls, v: object) -> object:
        return None if isinstance(v, str) and not v.strip() else v

    @field_validator("attack_max_eps")
    @classmethod
    def _eps_bound(cls, v: float) -> float:
        if v > MAX_ATTACK_EPS + 1e-9:
            raise ValueError(f"attack_max_eps must be <= 16/255 ({MAX_ATTACK_EPS:.5f}) in [0, 1] pixel units, got {v}")
        return v

    @field_validator("attack_max_steps")
    @classmethod
    def _steps_bound(cls, v: int) -> int:
        if v > MAX_ATTACK_STEPS:
            raise ValueError(f"attack_max_steps must be <= {MAX_ATTACK_STEPS}, got {v}")
        return v

    @field_validator("default_model")
    @classmethod
    def _model_name(cls, v: str) -> str:
        if not v or "/" in v or v.startswith("."):
            raise ValueError(f"default_model must be a plain folder name, got {v!r}")
        return v

    @model_validator(mode="after")
    def _consistent(self) -> Settings:
        if self.index == "faiss-gpu" and self.device == "cpu":
            raise ValueError("index 'faiss-gpu' needs device 'cuda' or 'auto', not 'cpu'")
        if self.processes() > 1 and self.state_dir is not None:
            # each process would keep its own live bank and rewrite the same overlay: one process's update would
            # silently drop the examples another had acknowledged
            raise ValueError("state_dir (added examples) needs one process: with workers > 1 each would keep its own "
                             "bank and overwrite the others' acknowledged examples; set SATML_WORKERS=1, or run "
                             "replicas with a state folder each")
        return self
