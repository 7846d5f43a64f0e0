"""Multipart forms read by the route itself, for the hot path (`POST /classify`).

FastAPI solves a form parameter by parameter on every request (dependency resolution, per-field validation,
typing introspection): ~15 % of the event loop under load in issue 17's profile, more than the multipart parse
itself. A route on the hot path instead reads the form once with Starlette and validates its scalar fields with
one pydantic model; the same model and the same file-field list write the OpenAPI request body
(`request_body`), so the documentation and the validation cannot drift apart. Errors keep FastAPI's shapes: a
bad field is a `RequestValidationError` (422 `invalid_parameters`), a malformed body 400.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any, TypeVar

from fastapi import Request
from fastapi.exceptions import RequestValidationError
from pydantic import BaseModel, ValidationError
from starlette.datastructures import UploadFile
from starlette.exceptions import HTTPException

M = TypeVar("M", bound=BaseModel)
# OpenAPI 3.1 marks file parts by contentMediaType; on an optional (or list) field FastAPI puts it inside
# anyOf/items only, where clients (schemathesis among them) do not see that the part is a file: routes declaring
# File parameters add it to the field (json_schema_extra), request_body puts it on both levels
BINARY = {"contentMediaType": "application/octet-stream"}
FILE_PART = {"type": "string", **BINARY}


@dataclass(frozen=True)
class FileField:
    """A file part of the form: `many` takes the part repeated (a list), otherwise one file."""

    name: str
    description: str
    many: bool = False


def request_body(fields: type[BaseModel], files: tuple[FileField, ...]) -> dict[str, Any]:
    """`openapi_extra` for a route reading `fields` + `files` with `read_form`: the multipart body schema (every
    part optional, as FastAPI documents optional form parameters)."""
    schema = fields.model_json_schema()
    properties: dict[str, Any] = {}
    for f in files:
        one = FILE_PART if not f.many else {"type": "array", "items": FILE_PART}
        properties[f.name] = {"anyOf": [one, {"type": "null"}], **BINARY, "title": f.name.title(),
                              "description": f.description}
    properties.update(schema.get("properties", {}))
    body = {"type": "object", "title": schema.get("title", fields.__name__), "properties": properties}
    return {"requestBody": {"content": {"multipart/form-data": {"schema": body}}}}


@asynccontextmanager
async def read_form(request: Request, fields: type[M],
                    files: tuple[FileField, ...]) -> AsyncIterator[tuple[list[UploadFile], M]]:
    """The uploads (in `files` order, each field's parts in body order) and the validated scalar fields; the
    uploads' spooled files are closed when the block ends. An empty scalar value counts as absent (FastAPI's
    rule for optional form fields), a repeated one its last value; text in a file field or a file in a text
    field is a 422, as FastAPI had them."""
    try:
        form = await request.form()
    except HTTPException:  # Starlette's 400 for a malformed multipart body
        raise
    except Exception as e:  # what FastAPI answers for any other body it cannot parse
        raise HTTPException(400, "There was an error parsing the body") from e
    try:
        uploads: list[UploadFile] = []
        errors: list[dict[str, Any]] = []
        for f in files:
            for value in form.getlist(f.name):
                if isinstance(value, str):
                    errors.append({"type": "value_error", "loc": ("body", f.name),
                                   "msg": "Value error, expected a file part, got a text field", "input": None})
                else:
                    uploads.append(value)
        names = set(fields.model_fields)
        raw = {k: v for k, v in form.items() if k in names and v != ""}
        errors.extend({"type": "value_error", "loc": ("body", k), "msg": "Value error, expected a text field, got "
                       "a file part", "input": None} for k, v in raw.items() if not isinstance(v, str))
        try:
            parsed = fields.model_validate({k: v for k, v in raw.items() if isinstance(v, str)})
        except ValidationError as e:
            errors.extend({**err, "loc": ("body", *err["loc"])} for err in e.errors(include_url=False))
        if errors:
            raise RequestValidationError(errors)
        yield uploads, parsed
    finally:
        await form.close()
