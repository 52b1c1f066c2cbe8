"""The file observer: the mirror audit's latest.json (SPEC §1) through the strict
converter; a file that is missing or no valid measurement means no contribution to the
round, with a warning that names what is wrong, never an exception."""

from __future__ import annotations

import json
import logging
import math
from pathlib import Path
from typing import Any

import pytest

from anna_trio.models import FileObserver, TisComponents
from anna_trio.observer import ConfiguredObserver, Measurement

FORECAST = "sha256:" + "ab" * 32
OUTCOME = "sha256:" + "cd" * 32


def latest(**changes: Any) -> dict[str, Any]:
    """A valid latest.json, as the mirror audit writes it, with `changes` applied."""
    data: dict[str, Any] = {
        "tis_components": {
            "prediction_accuracy": 0.85,
            "ethical_alignment": 0.81,
            "coherence_stability": 0.9,
        },
        "tis_overall": 0.851,
        "bias_flags": ["RecencyBias"],
        "forecast_hash": FORECAST,
        "outcome_hash": OUTCOME,
    }
    data.update(changes)
    return data


async def measure(path: Path) -> Measurement | None:
    return await ConfiguredObserver(FileObserver(path=path), "node_001").measure("round_001", 24)


async def measure_json(tmp_path: Path, text: str) -> Measurement | None:
    path = tmp_path / "latest.json"
    path.write_text(text)
    return await measure(path)


async def test_a_valid_file_is_the_measurement(tmp_path: Path) -> None:
    """Every field of latest.json is read as it is written."""
    assert await measure_json(tmp_path, json.dumps(latest())) == Measurement(
        tis_components=TisComponents(0.85, 0.81, 0.9),
        tis_overall=0.851,
        bias_flags=("RecencyBias",),
        forecast_hash=FORECAST,
        outcome_hash=OUTCOME,
    )


async def test_the_accepted_format_is_unchanged(tmp_path: Path) -> None:
    """Integers are numbers, bias_flags may be left out, and repeated or unsorted flags
    are taken as a set."""
    components = {"prediction_accuracy": 1, "ethical_alignment": 0, "coherence_stability": 0.5}
    data = latest(tis_components=components, tis_overall=1)
    del data["bias_flags"]
    measured = await measure_json(tmp_path, json.dumps(data))
    assert measured is not None
    assert measured.tis_components == TisComponents(1.0, 0.0, 0.5)
    assert type(measured.tis_overall) is float
    assert measured.bias_flags == ()
    flags = ["RecencyBias", "AnchoringBias", "RecencyBias"]
    measured = await measure_json(tmp_path, json.dumps(latest(bias_flags=flags)))
    assert measured is not None
    assert measured.bias_flags == ("AnchoringBias", "RecencyBias")


@pytest.mark.parametrize(
    ("text", "problem"),
    [
        (json.dumps(latest(tis_overall="0.5")), "tis_overall: must be a finite number in [0, 1]"),
        (json.dumps(latest(tis_overall=True)), "tis_overall: must be a finite number in [0, 1]"),
        (
            json.dumps(
                latest(
                    tis_components={
                        "prediction_accuracy": "0.85",
                        "ethical_alignment": False,
                        "coherence_stability": 0.9,
                    }
                )
            ),
            "tis_components.prediction_accuracy: must be a finite number in [0, 1]; "
            "tis_components.ethical_alignment: must be a finite number in [0, 1]",
        ),
        (json.dumps(latest(tis_overall=math.nan)), "tis_overall: must be a finite number"),
        (
            json.dumps(latest(tis_overall=math.inf)),  # `Infinity`, which json.loads accepts
            "tis_overall: must be a finite number",
        ),
        (json.dumps(latest(tis_overall=10**400)), "tis_overall: must be a finite number"),
        (
            json.dumps(latest(total_audits=3)),
            "total_audits: unknown key (allowed: bias_flags, forecast_hash, outcome_hash, "
            "tis_components, tis_overall)",
        ),
        (
            json.dumps(latest(tis_components={**latest()["tis_components"], "recency": 0.5})),
            "tis_components.recency: unknown key",
        ),
        (json.dumps(latest(bias_flags="RecencyBias")), "bias_flags: must be a list"),
        (json.dumps(latest(forecast_hash=7)), "forecast_hash: must be a non-empty string"),
        (
            json.dumps({k: v for k, v in latest().items() if k != "tis_overall"}),
            "tis_overall: is required",
        ),
        (json.dumps([latest()]), "top level: must be a mapping"),
    ],
    ids=[
        "string-number",
        "bool",
        "components-string-and-bool",
        "nan",
        "infinity",
        "huge-integer",
        "unknown-key",
        "unknown-component",
        "flags-string",
        "hash-integer",
        "missing",
        "not-a-mapping",
    ],
)
async def test_an_invalid_file_is_refused_with_the_field_named(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, text: str, problem: str
) -> None:
    """No coercion, no unknown keys, finite numbers only: the node does not contribute
    and logs a warning naming each bad field."""
    with caplog.at_level(logging.WARNING, logger="anna.observer"):
        assert await measure_json(tmp_path, text) is None
    [record] = caplog.records
    assert record.levelno == logging.WARNING
    assert "not contributing to this round" in record.getMessage()
    assert problem in record.getMessage()


@pytest.mark.parametrize(
    "content", [None, b"", b"{", b"\xff\xfe"], ids=["missing", "empty", "torn", "not-utf8"]
)
async def test_an_unreadable_file_is_no_contribution(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, content: bytes | None
) -> None:
    """A missing file or one that is no JSON is logged and skipped, as before."""
    path = tmp_path / "latest.json"
    if content is not None:
        path.write_bytes(content)
    with caplog.at_level(logging.WARNING, logger="anna.observer"):
        assert await measure(path) is None
    [record] = caplog.records
    assert f"observer file {path} unusable" in record.getMessage()
