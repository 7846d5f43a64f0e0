"""GET /models, GET /models/{name}: what is served, with manifests, metrics and model cards."""

from __future__ import annotations

from pathlib import Path

from fastapi import APIRouter
from fastapi.responses import FileResponse

from app.deps import RegistryDep
from app.errors import ApiError, responses
from app.registry import ServedModel
from app.schemas import ModelDetail, ModelList, ModelSummary
from training.artifact import CARD

router = APIRouter(prefix="/models", tags=["models"])
CARD_ASSETS = {".png": "image/png", ".jpg": "image/jpeg", ".svg": "image/svg+xml", ".md": "text/markdown"}


def summary(m: ServedModel, default: bool) -> ModelSummary:
    spec = m.artifact.spec
    return ModelSummary(
        name=m.name, artifact_name=spec.name, description=spec.description, dataset=spec.dataset or "",
        classes=m.classes, input_size=m.input_size, encoder=spec.encoder.to_dict(), knn=spec.knn.to_dict(),
        training_method=spec.method, metrics=spec.metrics.to_dict() if spec.metrics else {}, default=default,
        device=m.device, runtime=m.runtime, index=m.index, bank_size=m.bank_size,
        bank_version=m.live.state.version if m.live is not None else 0)


@router.get("", response_model=ModelList, responses=responses(503))
def list_models(registry: RegistryDep) -> ModelList:
    """Every model this server answers for, with its classes, encoder, training method and metrics."""
    return ModelList(default_model=registry.default,
                     models=[summary(m, m.name == registry.default) for m in registry.models.values()])


@router.get("/{name}", response_model=ModelDetail, responses=responses(404, 503))
def get_model(name: str, registry: RegistryDep) -> ModelDetail:
    """One model: the summary, the full artifact manifest and the model card (markdown)."""
    m = registry.get(name)
    card_path = m.artifact.path / CARD
    card = card_path.read_text(encoding="utf-8", errors="replace") if card_path.is_file() else None
    return ModelDetail(**summary(m, m.name == registry.default).model_dump(), manifest=m.manifest, card=card)


@router.get("/{name}/files/{filename}", response_class=FileResponse, responses=responses(404, 503))
def get_model_file(name: str, filename: str, registry: RegistryDep) -> FileResponse:
    """A file of the model card (plots, card.md): only files the manifest lists and hashes."""
    m = registry.get(name)
    suffix = Path(filename).suffix.lower()
    if filename not in m.artifact.spec.files or suffix not in CARD_ASSETS or Path(filename).name != filename:
        raise ApiError(404, "not_found", f"model {name!r} has no card file {filename!r}")
    return FileResponse(m.artifact.path / filename, media_type=CARD_ASSETS[suffix])
