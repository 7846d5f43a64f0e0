"""Prometheus metrics on a per-app `CollectorRegistry` (no process-global state: tests build many apps).

With several server processes (`SATML_WORKERS` > 1) a scrape reaches one of them, and its own registry would show
that process's share of the traffic only. `satml-serve` then sets PROMETHEUS_MULTIPROC_DIR for its workers
(before they import prometheus_client, which then keeps every value in a file per process there), and `render`
sums every process's files: counters and histograms over all processes, each gauge as its `multiprocess_mode` says.
"""

from __future__ import annotations

import os

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.multiprocess import MultiProcessCollector, mark_process_dead

MULTIPROC_DIR_ENV = "PROMETHEUS_MULTIPROC_DIR"

LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30)  # seconds
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512)  # images


class Metrics:
    """Every series the service exports; `registry` is what GET /metrics renders."""

    def __init__(self) -> None:
        r = self.registry = CollectorRegistry(auto_describe=True)
        self.requests = Counter("satml_http_requests", "HTTP requests by route template, method and status",
                                ["route", "method", "status"], registry=r)
        self.latency = Histogram("satml_http_request_duration_seconds", "HTTP request latency",
                                 ["route", "method"], buckets=LATENCY_BUCKETS, registry=r)
        self.batch_size = Histogram("satml_inference_batch_size", "Images per batched forward pass", ["model"],
                                    buckets=BATCH_BUCKETS, registry=r)
        self.batch_latency = Histogram("satml_inference_batch_duration_seconds", "Forward + k-NN time of one batch",
                                       ["model"], buckets=LATENCY_BUCKETS, registry=r)
        # several processes: queue depths add up, a model is healthy / loaded only where it is in every process
        self.queue_depth = Gauge("satml_inference_queue_depth", "Requests waiting for a batch", ["model"], registry=r,
                                 multiprocess_mode="livesum")
        self.images = Counter("satml_images_classified", "Images classified", ["model"], registry=r)
        self.attack_queue_depth = Gauge("satml_attack_queue_depth", "Attacks running or waiting", registry=r,
                                        multiprocess_mode="livesum")
        self.attacks = Counter("satml_attacks", "Attack requests by model, method and outcome "
                               "(success, failure, rejected, timeout, error)", ["model", "method", "outcome"],
                               registry=r)
        self.attack_latency = Histogram("satml_attack_duration_seconds", "Run time of one /attack job",
                                        ["method"], buckets=LATENCY_BUCKETS, registry=r)
        self.certify_queue_depth = Gauge("satml_certify_queue_depth", "Certifications running or waiting", registry=r,
                                         multiprocess_mode="livesum")
        self.certifications = Counter("satml_certifications", "POST /certify requests by model and outcome "
                                      "(certified, abstained, rejected, timeout, error)", ["model", "outcome"],
                                      registry=r)
        self.worker_healthy = Gauge("satml_batch_worker_healthy", "1 while a model's batch worker is alive and "
                                    "no batch runs past its deadline, else 0", ["model"], registry=r,
                                    multiprocess_mode="livemin")
        self.models_loaded = Gauge("satml_models_loaded", "Models serving", registry=r, multiprocess_mode="livemin")
        self.models_skipped = Gauge("satml_models_skipped", "Artifact folders refused at start-up", registry=r,
                                    multiprocess_mode="livemax")

    def render(self) -> bytes:
        """The exposition text: this app's series, or with PROMETHEUS_MULTIPROC_DIR set (several server
        processes) every process's, read from their files."""
        if os.environ.get(MULTIPROC_DIR_ENV):
            merged = CollectorRegistry()
            MultiProcessCollector(merged)
            return generate_latest(merged)
        return generate_latest(self.registry)

    def process_ending(self) -> None:
        """With several processes: this one's live gauges (queue depths, health, models loaded) leave the merged
        view as it ends, so a replaced process's last values are not counted beside its successor's."""
        if folder := os.environ.get(MULTIPROC_DIR_ENV):
            mark_process_dead(os.getpid(), folder)
