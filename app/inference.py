"""A request's images through a model's batch worker, with its failures as HTTP errors (429, 503).

The async routes call these rather than `BatchWorker.submit`, so that a full queue, a timeout or a
stopped worker answer alike; /attack and /certify run on threads of their own and submit directly.
"""

from __future__ import annotations

import asyncio

import numpy as np
import torch
from torch import Tensor

from app.batching import QueueFull, Votes, WorkerClosed
from app.errors import ApiError
from app.predictor import unpack_output
from app.registry import ServedModel


def batch_tensor(pixels: list[np.ndarray]) -> Tensor:
    """Model inputs uint8 [S, S, 3] (already at the model's size, see `app.images.Decoded`) -> [n, 3, S, S]
    float in [0, 1]. Cheap: the resize happened in the decode worker, not here on the event loop."""
    return torch.from_numpy(np.stack(pixels)).permute(0, 3, 1, 2).float().div_(255)


async def predict(model: ServedModel, x: Tensor, timeout_s: float) -> Votes:
    """Through the model's batching worker; ApiError 429 when its queue is full, 503 if it does not
    answer within timeout_s (the queued job is then cancelled: the worker skips it)."""
    pred, out = await predict_embed(model, x, timeout_s)
    return pred, unpack_output(model, out)[0]


async def embed(model: ServedModel, x: Tensor, timeout_s: float) -> Tensor:
    """Embeddings [n, D] of images [n, 3, S, S], through the batching worker (same batches as /classify)."""
    _, out = await predict_embed(model, x, timeout_s)
    return unpack_output(model, out)[1]


async def predict_embed(model: ServedModel, x: Tensor, timeout_s: float) -> Votes:
    """(pred [n], packed votes + embeddings [n, C + D]) from the worker; errors as `predict`."""
    try:
        # batched on this event loop (SATML_LOOP_BATCHING) or handed to the model's batch worker thread
        answer = (model.loop_batcher.submit(x) if model.loop_batcher is not None
                  else asyncio.wrap_future(model.worker.submit(x)))
    except QueueFull as e:
        raise ApiError(429, "queue_full", f"{e}; retry later", headers={"Retry-After": str(e.retry_after_s)}) from e
    try:
        return await asyncio.wait_for(answer, timeout_s)
    except TimeoutError as e:
        raise ApiError(503, "inference_timeout", f"no answer from model {model.name!r} within {timeout_s:g} s",
                       headers={"Retry-After": "1"}) from e
    except WorkerClosed as e:
        raise ApiError(503, "model_unavailable", f"model {model.name!r} is not serving ({e})") from e
