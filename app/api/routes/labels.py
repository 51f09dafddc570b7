"""GET /labels: the race and attribute names POST /upscale accepts (the web page fills its
controls from them)."""

from __future__ import annotations

from fastapi import APIRouter
from pydantic import BaseModel, Field

from app.api.deps import LabelsDep, OwnerDep
from app.api.errors import ERROR_RESPONSES

router = APIRouter(tags=["labels"])


class LabelsView(BaseModel):
    races: list[str] = Field(..., description="Values accepted by the `race` form field.")
    attributes: list[str] = Field(
        ..., description="Names accepted in `attribute=Name:0|1` form fields."
    )
    source: str = Field(
        ..., description="Where the names come from: the weights manifest's path or 'defaults'."
    )


@router.get(
    "/labels",
    response_model=LabelsView,
    summary="Race and attribute names",
    responses=ERROR_RESPONSES,
)
async def get_labels(labels: LabelsDep, owner: OwnerDep) -> LabelsView:
    """The label names of the loaded weights (re-read when the manifest changes)."""
    del owner  # only checked: with API keys, this needs one like every other route
    return LabelsView(
        races=list(labels.races), attributes=list(labels.attributes), source=labels.source
    )
