"""Service options that mirror a settings model: a flag per field, the environment underneath."""

from __future__ import annotations

import argparse
from collections.abc import Callable, Mapping
from typing import Any, TypeVar

from pydantic import BaseModel, ValidationError

from flowcloud.cli.errors import CommandError, settings_error
from flowcloud.settings import ServiceSettings

SettingsT = TypeVar("SettingsT", bound=BaseModel)


def field_option(parser: argparse.ArgumentParser, model: type[BaseModel]) -> Callable[..., None]:
    """``option("--batch-size", type=int)``: a flag for the field ``batch_size``, with its description as
    help and no default, so that the environment's value stands unless the flag is given."""
    fields = model.model_fields

    def option(flag: str, **kwargs: Any) -> None:
        name = flag.removeprefix("--").replace("-", "_")
        kwargs.setdefault("help", fields[name].description)
        parser.add_argument(flag, dest=name, default=None, **kwargs)

    return option


def build_settings(model: type[SettingsT], overrides: Mapping[str, Any]) -> SettingsT:
    """The model from the environment with ``overrides`` on top; bad values as one CommandError line."""
    try:
        return model(**{name: value for name, value in overrides.items() if value is not None})
    except ValidationError as exc:
        raise settings_error(exc) from None


def settings_from_options(model: type[SettingsT], args: argparse.Namespace) -> SettingsT:
    """Environment settings overridden by the options given on the command line (named as the fields)."""
    return build_settings(model, {k: v for k, v in vars(args).items() if k in model.model_fields})


def control_url(given: str | None) -> str:
    """The control-plane Redis URL: ``given``, else the environment's; a bad setting as one line."""
    if given:
        return given
    try:
        return build_settings(ServiceSettings, {}).control_url
    except ValueError as exc:  # a Redis Cluster without a control-plane URL
        raise CommandError(str(exc)) from None
