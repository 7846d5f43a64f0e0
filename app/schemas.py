"""Response bodies (they are also the OpenAPI schema the demo page and schemathesis rely on)."""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, Field

from app.errors import ErrorBody


class Vote(BaseModel):
    label: str
    class_id: int
    share: float = Field(description="fraction of the k nearest neighbours voting for this class, in [0, 1]")


class ClassRef(BaseModel):
    label: str
    class_id: int


class Prediction(BaseModel):
    label: str = Field(description="the k-NN majority vote")
    class_id: int
    votes: list[Vote] = Field(description="top classes by vote share, highest first (the predicted class first)")
    credibility: float | None = Field(None, description="conformal p-value of the predicted class (Deep k-NN, "
                                      "calibrated on held-out data): low means unlike correctly classified inputs; "
                                      "null when the model has no calibration")
    confidence: float | None = Field(None, description="1 - the second-highest class p-value; null without calibration")
    abstained: bool = Field(False, description="credibility below the threshold (min_credibility): the service "
                                               "declines to answer; label is kept for information")


class ClassifyResult(Prediction):
    filename: str
    width: int = Field(description="width of the uploaded image (after EXIF orientation), pixels")
    height: int


class ClassifyResponse(BaseModel):
    model: str
    results: list[ClassifyResult] = Field(description="one per uploaded file, in upload order")
    latency_ms: float


class Transfer(BaseModel):
    """The perturbation crafted against the main model, shown to another model."""

    clean: Prediction
    adversarial: Prediction
    success: bool


class AttackOutcome(BaseModel):
    clean: Prediction
    adversarial: Prediction
    success: bool = Field(description="untargeted: the prediction changed; targeted: it became the target")
    linf: float = Field(description="L-inf size of the perturbation, [0, 1] pixel units")
    l2: float = Field(description="L2 size of the perturbation, [0, 1] pixel units")
    adversarial_png: str = Field(description="the adversarial image (model input size), PNG, base64")
    perturbation_png: str = Field(description="the perturbation scaled to the full range (grey = 0), PNG, base64")


class Comparison(BaseModel):
    model: str
    transfer: Transfer
    attack: AttackOutcome = Field(description="this model attacked in turn with the same settings")


class AttackResponse(AttackOutcome):
    model: str
    method: str
    eps: float
    steps: int
    target: ClassRef | None = Field(None, description="the target class of a targeted attack, else null")
    latency_ms: float
    compare: list[Comparison] = []


class ModelSummary(BaseModel):
    name: str = Field(description="the name requests use (the artifact folder name)")
    artifact_name: str = Field(description="the name inside the manifest")
    description: str
    dataset: str
    classes: list[str]
    input_size: int
    encoder: dict[str, Any]
    knn: dict[str, Any]
    training_method: str
    metrics: dict[str, Any]
    default: bool
    device: str
    runtime: str
    index: str
    bank_size: int = Field(0, description="embeddings in the bank now (shipped + examples added live)")
    bank_version: int = Field(0, description="0: the shipped bank; +1 per live update (POST/DELETE .../examples)")


class ModelList(BaseModel):
    default_model: str | None
    models: list[ModelSummary]


class ModelDetail(ModelSummary):
    manifest: dict[str, Any]
    card: str | None = Field(description="model card, markdown")


class Live(BaseModel):
    status: str


class ModelReadiness(BaseModel):
    device: str
    runtime: str
    index: str
    classes: int
    bank_size: int
    worker: str = Field("ok", description="batch worker: 'ok', 'stuck' (a batch past its deadline), 'dead' or 'closed'")


class Ready(BaseModel):
    status: str = Field(description="'ready' or 'not_ready'")
    default_model: str | None
    models: dict[str, ModelReadiness]
    skipped: dict[str, str] = Field(description="artifact folders refused at start-up, with the reason")


class NotReady(Ready):
    error: ErrorBody


class ExampleInfo(BaseModel):
    id: str
    label: str
    time: str = Field(description="when it was added, ISO 8601 UTC")
    filename: str = Field(description="the uploaded file's name")
    sha256: str = Field(description="sha256 of the uploaded file's bytes")


class ExamplesAdded(BaseModel):
    model: str
    label: str
    class_id: int
    new_class: bool = Field(description="true when this request added the class")
    ids: list[str] = Field(description="one per uploaded file, in upload order (DELETE .../examples/{id} undoes)")
    version: int = Field(description="bank version: 0 is the shipped bank, +1 per update")
    bank_size: int = Field(description="embeddings in the bank now (shipped + added)")
    classes: int


class ExamplesRemoved(BaseModel):
    model: str
    ids: list[str]
    version: int
    bank_size: int


class ExampleList(BaseModel):
    model: str
    version: int
    bank_size: int
    shipped_size: int
    classes: list[str]
    persistent: bool = Field(description="false when the server has no SATML_STATE_DIR (nothing can be added)")
    examples: list[ExampleInfo]
