"""Response models of the API (for the OpenAPI docs; tests validate the answers against them), and the
schema fix for multipart forms."""

from typing import Any

from fastapi import FastAPI
from pydantic import BaseModel


class SearchHit(BaseModel):
    """One result of one variant."""

    rank: int
    id: str
    score: float
    title: str
    image: str
    photo: str


class SearchQuery(BaseModel):
    """What was asked."""

    kind: str
    text: str | None
    image: str | None
    product: str | None
    weight: float | None


class SearchResponse(BaseModel):
    """Ranked results per variant; `shared` lists the ids every returned variant found, in rank order."""

    category: str
    query: SearchQuery
    k: int
    results: dict[str, list[SearchHit]]
    shared: list[str]
    took_ms: float


class ErrorResponse(BaseModel):
    """Every error answer."""

    error: str


ERRORS: dict[int | str, dict[str, Any]] = {
    code: {"model": ErrorResponse} for code in (404, 413, 415, 422, 500, 503)
}
# a malformed multipart body or too many parts (400), a body that does not arrive in time (408)
SEARCH_ERRORS: dict[int | str, dict[str, Any]] = {
    code: {"model": ErrorResponse} for code in (400, 404, 408, 413, 415, 422, 500, 503)
}


def _drop_null(prop: dict[str, Any]) -> dict[str, Any]:
    """A schema without its `null` alternative (`anyOf: [X, null]` becomes X)."""
    alternatives = [a for a in prop.get("anyOf", []) if a.get("type") != "null"]
    if len(alternatives) != 1 or len(prop["anyOf"]) != 2:
        return prop
    rest = {k: v for k, v in prop.items() if k != "anyOf"}
    if rest.get("default", 0) is None:
        del rest["default"]
    return {**alternatives[0], **rest}


def forms_not_nullable(app: FastAPI) -> None:
    """Make the app's OpenAPI schema say that a multipart field is a value or absent, never null.

    The route signatures say `str | None = None` (None: the field was left out), which FastAPI turns
    into `anyOf: [string, null]`; a form cannot send a null, and fuzzers that believe the schema send
    the string "null" and count the 422 against the server.
    """
    plain = app.openapi

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            schema = plain()
            for body in _form_bodies(schema):
                body["properties"] = {k: _drop_null(v) for k, v in body.get("properties", {}).items()}
            app.openapi_schema = schema
        return app.openapi_schema

    app.openapi = openapi  # type: ignore[method-assign]


def _form_bodies(schema: dict[str, Any]) -> list[dict[str, Any]]:
    """The component schemas of every multipart request body."""
    names = []
    for ops in schema.get("paths", {}).values():
        for op in ops.values():
            content = op.get("requestBody", {}).get("content", {})
            ref = content.get("multipart/form-data", {}).get("schema", {}).get("$ref", "")
            if ref:
                names.append(ref.rsplit("/", 1)[-1])
    components = schema.get("components", {}).get("schemas", {})
    return [components[n] for n in names if n in components]
