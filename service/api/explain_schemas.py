"""Request and response models of the match explanation."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field
from spectree.model_adapter.pydantic_adapter import BaseFile


class ExplainQuery(BaseModel):
    """Which match to explain: a stored query image and a result."""

    model_config = ConfigDict(extra="forbid")

    query_id: str = Field(max_length=64)
    result_id: str = Field(max_length=64)
    model: str | None = Field(default=None, max_length=128)
    format: Literal["png", "json"] = "png"


class ExplainForm(BaseModel):
    """An uploaded query photo and the result to explain."""

    model_config = ConfigDict(extra="forbid")

    file: BaseFile
    result_id: str = Field(max_length=64)
    model: str | None = Field(default=None, max_length=128)
    format: Literal["png", "json"] = "png"


class SharedClass(BaseModel):
    """An ImageNet class both images are likely to show."""

    label: str
    score: float = Field(description="p_query * p_result, normalised over the classes")
    query_p: float
    result_p: float


class Point(BaseModel):
    """A pixel of the result image."""

    x: int
    y: int


class ExplanationOut(BaseModel):
    """Where the result matches the query (format=json)."""

    result_id: str
    model: str
    width: int
    height: int
    grid: list[list[float]] = Field(description="cosine similarity of each feature-map cell "
                                                "with the query's pooled vector, rows top down")
    peak: Point = Field(description="centre of the hottest cell, in result pixels")
    similarity: float = Field(description="cosine of the whole-image pooled vectors")
    classes: list[SharedClass]
