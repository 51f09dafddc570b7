"""One request model: the API form, the CLI's options and the stored job options agree."""

from __future__ import annotations

import inspect
from typing import Any

import pytest
import typer.main

from app.api.request_form import request_form
from cli.main import app as cli_app
from likeness.errors import LikenessError
from likeness.jobs import JobOptions
from likeness.labels import canonical_attributes, format_attribute_pairs, parse_attribute_pairs
from likeness.request import UpscaleRequest, bounds, settle, validate_request
from likeness.settings import Settings

CLI_NAMES = {"attributes": "attr"}


def upscale_params() -> dict[str, Any]:
    command = typer.main.get_command(cli_app).commands["upscale"]  # type: ignore[attr-defined]
    return {p.name: p for p in command.params if p.name}


def test_the_cli_and_the_api_form_offer_every_field_of_the_request() -> None:
    cli = upscale_params()
    form = inspect.signature(request_form).parameters
    for name in UpscaleRequest.model_fields:
        assert CLI_NAMES.get(name, name) in cli, name
        assert {"attributes": "attribute"}.get(name, name) in form, name


@pytest.mark.parametrize("name", ["steps", "restarts", "seed", "eps", "views", "race_weight"])
def test_the_cli_bounds_are_the_models(name: str) -> None:
    low, high, low_open = bounds(name)
    option = upscale_params()[name]
    assert option.max == high  # type: ignore[attr-defined]
    assert option.min == (None if low_open else low)  # type: ignore[attr-defined]


def test_the_stored_options_are_the_request_with_steps_and_restarts_settled() -> None:
    settled = settle(UpscaleRequest(race="Black"), Settings(steps_default=7, restarts_default=3))
    options = JobOptions.model_validate(settled.model_dump())
    assert (options.steps, options.restarts, options.race) == (7, 3, "Black")
    assert set(UpscaleRequest.model_fields) <= set(JobOptions.model_fields)


def test_the_service_caps_are_inside_the_model_and_the_cli_has_the_model_only() -> None:
    settings = Settings()
    assert settings.steps_max <= bounds("steps")[1]
    assert settings.restarts_max <= bounds("restarts")[1]
    with pytest.raises(LikenessError) as e:
        settle(UpscaleRequest(steps=settings.steps_max + 1), settings)
    assert e.value.code == "out_of_range"
    assert settle(UpscaleRequest(steps=settings.steps_max + 1), settings, capped=False).steps == (
        settings.steps_max + 1
    )


def test_a_value_outside_the_model_is_out_of_range_and_named() -> None:
    with pytest.raises(LikenessError) as e:
        validate_request({"views": 17})
    assert e.value.code == "out_of_range" and "views must be between 1 and 16" in e.value.message


def test_both_attribute_spellings_are_read_and_one_is_written() -> None:
    wanted = parse_attribute_pairs(["Smiling=1", "Male:0,eyeglasses = 1"])
    assert wanted == {"Smiling": 1, "Male": 0, "eyeglasses": 1}
    assert format_attribute_pairs(wanted) == ["Smiling=1", "Male=0", "eyeglasses=1"]
    assert canonical_attributes(wanted, ("Eyeglasses", "Male", "Smiling")) == {
        "Smiling": 1,
        "Male": 0,
        "Eyeglasses": 1,
    }


@pytest.mark.parametrize("bad", ["Smiling", "Smiling=2", "=1", "Smiling=1,smiling=0"])
def test_a_bad_attribute_is_invalid_attribute(bad: str) -> None:
    with pytest.raises(LikenessError) as e:
        parse_attribute_pairs([bad])
    assert e.value.code == "invalid_attribute" and e.value.status == 422
