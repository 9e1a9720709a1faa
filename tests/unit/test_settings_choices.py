"""Settings check their own choices and sizes, from the environment as from the command line."""

from __future__ import annotations

import argparse
from typing import get_args

import pytest

from flowcloud.cli.errors import CommandError
from flowcloud.frames import ENCODINGS
from flowcloud.inference import COMPILE_MODES, PRECISIONS
from flowcloud.settings import GatewaySettings, WorkerSettings
from flowcloud.sizes import parse_size, size_argument
from services.gateway import cli as gateway_cli
from services.worker import cli as worker_cli
from services.worker.policy import MODES


def test_parse_size_is_one_rule() -> None:
    assert parse_size("256x512") == (256, 512)
    assert parse_size("8X4096") == (8, 4096)
    for bad in ("256", "ax b", "256x512x3", ""):
        with pytest.raises(ValueError, match=r"^size must look like HxW, e\.g\. 256x512; got "):
            parse_size(bad)
    for bad in ("0x8", "250x512", "256x4104", "-8x8"):
        with pytest.raises(ValueError, match=r"multiples of 8 within 8\.\.4096$"):
            parse_size(bad)
    with pytest.raises(argparse.ArgumentTypeError, match="multiples of 8"):
        size_argument("250x512")


def test_the_choices_come_from_the_settings() -> None:
    assert PRECISIONS == ("fp32", "bf16", "fp16")
    assert COMPILE_MODES == ("default", "reduce-overhead", "max-autotune")
    assert MODES == ("realtime", "complete")
    assert ENCODINGS == ("jpeg", "raw")
    # The settings fields accept exactly these, and the command lines offer exactly these.
    fields = {**WorkerSettings.model_fields, **GatewaySettings.model_fields}
    choices = {
        "precision": PRECISIONS,
        "compile_mode": COMPILE_MODES,
        "mode": MODES,
        "frame_encoding": ENCODINGS,
    }
    for name, values in choices.items():
        assert get_args(fields[name].annotation) == values, name
    offered = {}
    for configure in (worker_cli.configure, gateway_cli.configure):
        parser = argparse.ArgumentParser()
        configure(parser)
        offered.update({action.dest: tuple(action.choices or ()) for action in parser._actions})
    assert {name: offered[name] for name in choices} == choices


def worker_settings(*argv: str) -> str:
    parser = argparse.ArgumentParser()
    worker_cli.configure(parser)
    with pytest.raises(CommandError) as info:
        worker_cli.settings_from(parser.parse_args(argv))
    return str(info.value)


def test_worker_settings_from_the_environment_are_checked(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("FLOWCLOUD_WORKER_PRECISION", "fp8")
    assert worker_settings() == "invalid settings: precision: Input should be 'fp32', 'bf16' or 'fp16'"
    monkeypatch.delenv("FLOWCLOUD_WORKER_PRECISION")
    monkeypatch.setenv("FLOWCLOUD_WORKER_MODE", "fast")
    assert worker_settings() == "invalid settings: mode: Input should be 'realtime' or 'complete'"
    monkeypatch.setenv("FLOWCLOUD_WORKER_MODE", "complete")
    monkeypatch.setenv("FLOWCLOUD_WORKER_INPUT_SIZE", "250x500")
    assert worker_settings() == (
        "invalid settings: input_size: size '250x500': height and width must be multiples of 8 within 8..4096"
    )
    monkeypatch.delenv("FLOWCLOUD_WORKER_INPUT_SIZE")
    monkeypatch.setenv("FLOWCLOUD_WORKER_RANDOM_WEIGHTS", "true")
    assert worker_settings("--weights", "w.pt") == (
        "invalid settings: weights and random_weights exclude each other"
    )


def test_an_option_wins_over_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("FLOWCLOUD_WORKER_PRECISION", "fp8")
    parser = argparse.ArgumentParser()
    worker_cli.configure(parser)
    settings = worker_cli.settings_from(parser.parse_args(["--precision", "bf16", "--warmup-size", "64x128"]))
    assert settings.precision == "bf16" and settings.warmup_size == "64x128"


def test_the_gateway_model_size_is_checked() -> None:
    assert GatewaySettings(model_size="120x160").model_size == "120x160"
    with pytest.raises(ValueError, match=r"model_size\n.*multiples of 8"):
        GatewaySettings(model_size="100x100")


def test_the_firings_queue_bound_reaches_the_evaluator(monkeypatch: pytest.MonkeyPatch) -> None:
    """FLOWCLOUD_ALERTS_FIRINGS_MAXLEN bounds the delivery queue the evaluator trims (no connection
    is made: the clients connect on first use)."""
    from flowcloud.settings import AlertsSettings
    from services.alerts.service import AlertService

    monkeypatch.setenv("FLOWCLOUD_ALERTS_FIRINGS_MAXLEN", "250")
    assert AlertService(AlertsSettings()).evaluator.firings_maxlen == 250
    monkeypatch.setenv("FLOWCLOUD_ALERTS_FIRINGS_MAXLEN", "0")
    with pytest.raises(ValueError, match="firings_maxlen"):
        AlertsSettings()
