"""One query, as `cliprec recommend` and `cliprec serve` take it, checked once: when it is made.

A Query that exists is a valid one. What is wrong with it is a QueryError whose message names the
fields the way the asker spelled them: `str(e)` says `k must be >= 1, not 0` (the API answers 422),
`e.as_options()` says `--k must be >= 1, not 0` (the CLI's usage error).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from cliprec.errors import CliprecError

FIELDS = ("text", "image", "product", "k", "weight")


class QueryError(CliprecError):
    """A query that cannot be asked; its message template names fields as {text}, {k}, ..."""

    def __init__(self, template: str, **values: Any) -> None:
        self.template, self.values = template, values
        super().__init__(self._render(""))

    def _render(self, prefix: str) -> str:
        return self.template.format(**{f: prefix + f for f in FIELDS}, **self.values)

    def as_options(self) -> str:
        """The message with the fields spelled as command-line options (--text, --k, ...)."""
        return self._render("--")


@dataclass
class Query:
    """What was asked: a text, an image, both, or a product (more like this), and how many results.

    `image` is the picture's path or URL (`cliprec recommend` loads it) or an upload's file name (the
    API decodes the upload itself). `weight` is the text's weight when text and image are both given
    (None: params' `embed.text_weight`, the weight the product vectors were fused with).
    """

    text: str | None = None
    image: str | None = None
    product: str | None = None
    k: int = 5
    weight: float | None = None
    image_obj: Any = field(default=None, repr=False, compare=False)  # the decoded picture, for the grid

    def __post_init__(self) -> None:
        for name in ("text", "image", "product"):
            value = getattr(self, name)
            if value is not None and not value.strip():
                raise QueryError(f"{{{name}}} is empty")
        if self.product is not None and (self.text is not None or self.image is not None):
            raise QueryError("{product} (more like this) cannot be combined with {text} or {image}")
        if self.text is None and self.image is None and self.product is None:
            raise QueryError("no query: give {text}, {image} and/or {product}")
        if isinstance(self.k, bool) or not isinstance(self.k, int) or self.k < 1:
            raise QueryError("{k} must be >= 1, not {value!r}", value=self.k)
        if self.weight is not None and not 0.0 <= self.weight <= 1.0:
            raise QueryError("{weight} must be in [0, 1], not {value}", value=self.weight)

    @property
    def kind(self) -> str:
        """text | image | text+image | product."""
        if self.product is not None:
            return "product"
        return "+".join(k for k, v in (("text", self.text), ("image", self.image)) if v is not None)
