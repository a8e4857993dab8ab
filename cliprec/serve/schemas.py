"""Response models of the API (for the OpenAPI docs; tests validate the answers against them)."""

from typing import Any

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
