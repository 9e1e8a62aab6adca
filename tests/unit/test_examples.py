"""The examples a user applies are ones that run: real digests of what ``fleetlet demo`` uploads, and objects
the API's own models accept."""

from __future__ import annotations

from pathlib import Path

import yaml

from fleetlet.api.v1alpha1 import FleetJob, VehicleNode
from fleetlet.cli import examples
from tests.conftest import EXAMPLES


def test_the_example_fleetjob_names_exactly_the_model_and_input_this_version_builds(tmp_path: Path) -> None:
    rendered = examples.render(examples.build(tmp_path))
    assert (EXAMPLES / "fleetjob-digits.yaml").read_text() == rendered, (
        "examples/fleetjob-digits.yaml is stale (the example model's or input's bytes changed): run `make examples`")


def test_every_example_object_is_valid() -> None:
    kinds = {"FleetJob": FleetJob, "VehicleNode": VehicleNode}
    seen = 0
    for path in sorted(EXAMPLES.glob("*.yaml")):
        for doc in yaml.safe_load_all(path.read_text()):
            kinds[doc["kind"]].model_validate(doc)
            seen += 1
    assert seen >= 4
