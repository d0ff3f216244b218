"""Request and response models of the hashing and graph endpoints (issue 6)."""

from __future__ import annotations

from datetime import datetime
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field


class CodeSetCreate(BaseModel):
    """A code set to fit: an encoder of one model's vectors into `bits` bits."""

    model_config = ConfigDict(extra="forbid")

    name: str = Field(pattern=r"^[A-Za-z0-9_.-]{1,128}$")
    method: Literal["lsh", "spectral", "itq"] = "itq"
    bits: int = Field(default=256, ge=8, le=1024)
    model: str | None = Field(default=None, max_length=128)
    collection: str | None = Field(default=None, max_length=128,
                                   description="fit on and cover only this collection")
    seed: int = Field(default=0, ge=0, le=2**31 - 1)


class CodeSetOut(BaseModel):
    """A code set and how far its fitting got."""

    name: str
    method: str
    bits: int
    model: str
    collection: str | None = None
    seed: int
    status: str = Field(description="pending, ready or failed")
    error: str | None = None
    fitted_rows: int | None = None
    encoded: int = Field(description="images that have a code in this set now")
    bytes_per_image: int
    created_at: datetime
    fitted_at: datetime | None = None


class CodeSetList(BaseModel):
    """Every code set, oldest first."""

    items: list[CodeSetOut]
