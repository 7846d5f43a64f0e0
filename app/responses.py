"""Worker output -> response schemas: the k-NN votes of a batch as `schemas.Prediction` rows.

Runs on the event loop, per request, so it works on plain ints and the model's precomputed p-value table
(`ServedModel.p_table`), no tensor op per row.
"""

from __future__ import annotations

from typing import Any, cast

import torch
from fastapi import Response
from pydantic import BaseModel
from torch import Tensor

from app.registry import ServedModel
from app.schemas import Prediction, Vote
from training import conformal


def class_p_values(model: ServedModel, row: list[int]) -> list[float] | None:
    """Conformal p-value per class of one vote row (None without calibration): the table lookup, or
    `conformal.p_values` for a row whose votes do not add up to the table's k."""
    table, k = model.p_table, max(sum(row), 1)
    if table is None:
        return None
    if k == len(table) - 1:  # always, for real votes
        return [table[k - v] for v in row]
    return conformal.p_values(torch.tensor([row]), cast(Tensor, model.artifact.calibration), k)[0].tolist()


def to_predictions(model: ServedModel, pred: Tensor, counts: Tensor, top_k: int, min_credibility: float = 0.0,
                   cls: type[Prediction] = Prediction, **per_row: list[Any]) -> list[Any]:
    """Rows of (pred [B], counts [B, C]) -> `cls` objects: label, id, the top_k vote shares (predicted class
    first) and, when the artifact carries calibration scores, conformal credibility/confidence and abstention
    below `min_credibility` (`per_row`: extra fields per row, e.g. filename=[...])."""
    # the width of counts, not len(classes): a batch voted before a class was added (app.bank) has fewer columns
    classes, n_cls = model.classes, counts.shape[1]
    out = []
    for i, (p, row) in enumerate(zip(pred.tolist(), counts.tolist(), strict=True)):
        k = max(sum(row), 1)
        order = sorted(range(n_cls), key=lambda c: (c != p, -row[c], c))[:top_k]
        votes = [Vote(label=classes[c], class_id=c, share=row[c] / k) for c in order]
        extra = {name: values[i] for name, values in per_row.items()}
        pv = class_p_values(model, row)
        if pv is None:
            out.append(cls(label=classes[p], class_id=p, votes=votes, **extra))
            continue
        second = sorted(pv)[-2] if n_cls > 1 else 0.0
        out.append(cls(label=classes[p], class_id=p, votes=votes, credibility=pv[p], confidence=1 - second,
                       abstained=pv[p] < min_credibility, **extra))
    return out


def to_prediction(model: ServedModel, pred: int, counts: Tensor, top_k: int,
                  min_credibility: float = 0.0) -> Prediction:
    """One row (pred, counts [C]) -> Prediction; see `to_predictions`."""
    return to_predictions(model, torch.tensor([pred]), counts.view(1, -1), top_k, min_credibility)[0]


def json_response(body: BaseModel) -> Response:
    """`body` as JSON, serialised once by pydantic. A route that returns the model itself has FastAPI validate it
    again against `response_model` and walk it through `jsonable_encoder` before `json.dumps`: work per request
    on the event loop for a value the route has just built from typed fields. The route keeps `response_model`
    for the OpenAPI schema; the bytes are the same JSON document."""
    return Response(content=body.model_dump_json(), media_type="application/json")
