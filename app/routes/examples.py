"""POST/GET/DELETE /models/{name}/examples: teach a served model labelled examples live (issue 15).

The images go through the same decoding (`Decoder`) and the model's batching worker as /classify; their
embeddings are appended to the model's bank (app.bank: persisted overlay, atomic swap). Guarded: with an
API key configured these routes need it; without one they are refused unless `SATML_EXAMPLES_OPEN`.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from typing import Annotated, Any, TypeVar

from fastapi import APIRouter, Depends, File, Form, Query, Security, UploadFile
from starlette.concurrency import run_in_threadpool

from app.bank import Example, LiveBank, valid_label
from app.deps import DecoderDep, RegistryDep, SettingsDep, api_key_header, require_api_key
from app.errors import ApiError, responses
from app.forms import BINARY
from app.inference import batch_tensor, embed
from app.registry import ServedModel
from app.schemas import ExampleInfo, ExampleList, ExamplesAdded, ExamplesRemoved

router = APIRouter(prefix="/models", tags=["examples"])
T = TypeVar("T")


async def require_examples_access(settings: SettingsDep,
                                  key: Annotated[str | None, Security(api_key_header)] = None) -> None:
    """401 without the right key when one is configured; 403 when none is and the routes are not opened."""
    if settings.api_key is not None:
        await require_api_key(settings, key)
        return
    if not settings.examples_open:
        raise ApiError(403, "examples_closed", "live bank updates need an API key (SATML_API_KEY) or, for local "
                                               "use only, SATML_EXAMPLES_OPEN=true")


Guard = [Depends(require_examples_access)]


def _live(served: ServedModel, write: bool) -> LiveBank:
    live = served.live
    if live is None or (write and not live.persistent):
        raise ApiError(409, "no_state_dir", "this server keeps no state: set SATML_STATE_DIR to a writable folder "
                                            "to add examples")
    return live


async def _commit(served: ServedModel, update: Callable[..., T], *args: Any) -> T:
    """Run a bank update (`LiveBank.add` / `remove`) on a worker thread. Its new state is published only once it
    is persisted, so a failed write (disk full, read-only state folder) changes nothing: 507, not a 500."""
    try:
        return await run_in_threadpool(update, *args)
    except OSError as e:
        raise ApiError(507, "state_not_saved", f"model {served.name!r}: the update could not be persisted "
                                               f"({e.strerror or e}); nothing was changed") from e


def _info(e: Example) -> ExampleInfo:
    return ExampleInfo(id=e.id, label=e.label, time=e.time, filename=e.filename, sha256=e.sha256)


@router.post("/{name}/examples", response_model=ExamplesAdded, dependencies=Guard,
             responses=responses(400, 401, 403, 404, 409, 413, 415, 429, 503, 507))
async def add_examples(
    name: str,
    registry: RegistryDep,
    settings: SettingsDep,
    decoder: DecoderDep,
    label: Annotated[str, Form(description="class of every image: an existing class or a new one")],
    files: Annotated[list[UploadFile], File(description="one or more images (as /classify)",
                                            json_schema_extra=BINARY)],
) -> ExamplesAdded:
    """Embed the images with the model's encoder (same preprocessing and batching as /classify) and add
    them to its bank as examples of `label`; a new class name adds a class. Answers once the addition is
    persisted: it survives a restart."""
    served = registry.get(name)
    live = _live(served, write=True)
    why = valid_label(label)
    if why is not None:
        shown = label if len(label) <= 64 else f"{label[:64]}..."
        raise ApiError(422, "invalid_label", f"label {shown!r}: {why}")
    if not files:
        raise ApiError(422, "invalid_parameters", "no image: send one or more files in the multipart field 'files'")
    if len(files) > settings.examples_max_per_request:
        raise ApiError(413, "too_many_files", f"{len(files)} files in one request; the limit for examples is "
                                              f"{settings.examples_max_per_request}")
    named = [(u.filename or f"file{i}", await u.read()) for i, u in enumerate(files)]
    size = served.input_size
    images = await decoder.decode_named(named, [size])
    z = await embed(served, batch_tensor([d.pixels[size] for _, d in images]), settings.request_timeout_s)
    hashes = [hashlib.sha256(data).hexdigest() for _, data in named]
    async with live.lock:  # one update of this model at a time; /classify keeps reading the published state
        have = len(live.state.examples)
        if have + len(named) > settings.examples_max_per_model:
            raise ApiError(413, "bank_full", f"model {served.name!r} has {have} added examples; the limit is "
                                             f"{settings.examples_max_per_model} (DELETE some first)")
        new_class = label not in live.state.classes
        st, ids = await _commit(served, live.add, label, z, [n for n, _ in images], hashes)
    return ExamplesAdded(model=served.name, label=label, class_id=st.classes.index(label), new_class=new_class,
                         ids=ids, version=st.version, bank_size=st.size, classes=len(st.classes))


@router.get("/{name}/examples", response_model=ExampleList, dependencies=Guard,
            responses=responses(401, 403, 404, 503))
async def list_examples(name: str, registry: RegistryDep,
                        label: Annotated[str | None, Query(max_length=64, description="only this class")] = None,
                        ) -> ExampleList:
    """The examples added to the model's bank (oldest first), with the bank version and size."""
    served = registry.get(name)
    live = _live(served, write=False)
    st = live.state
    rows = [_info(e) for e in st.examples if label is None or e.label == label]
    return ExampleList(model=served.name, version=st.version, bank_size=st.size, shipped_size=live.shipped_size,
                       classes=list(st.classes), persistent=live.persistent, examples=rows)


async def _remove(served: ServedModel, keep: Callable[[Example], bool], what: str) -> ExamplesRemoved:
    live = _live(served, write=True)
    async with live.lock:
        st, gone = await _commit(served, live.remove, keep)
    if not gone:
        raise ApiError(404, "example_not_found", f"model {served.name!r} has no added example {what}")
    return ExamplesRemoved(model=served.name, ids=gone, version=st.version, bank_size=st.size)


@router.delete("/{name}/examples/{example_id}", response_model=ExamplesRemoved, dependencies=Guard,
               responses=responses(401, 403, 404, 409, 503, 507))
async def delete_example(name: str, example_id: str, registry: RegistryDep) -> ExamplesRemoved:
    """Undo one addition (by the id POST returned)."""
    shown = example_id if len(example_id) <= 64 else f"{example_id[:64]}..."
    return await _remove(registry.get(name), lambda e: e.id != example_id, f"with id {shown!r}")


@router.delete("/{name}/examples", response_model=ExamplesRemoved, dependencies=Guard,
               responses=responses(401, 403, 404, 409, 503, 507))
async def delete_examples(name: str, registry: RegistryDep,
                          label: Annotated[str, Query(min_length=1, max_length=64,
                                                      description="remove every added example of this class")],
                          ) -> ExamplesRemoved:
    """Undo every addition of one class (shipped examples are never removed)."""
    return await _remove(registry.get(name), lambda e: e.label != label, f"of class {label!r}")
