"""The CRDs in crds/ are exactly what the models generate, and they are structural as the API server demands."""

from __future__ import annotations

from typing import Any

import yaml

from fleetlet import crdgen
from tests.conftest import CRDS


def test_crds_on_disk_match_the_models() -> None:
    assert crdgen.main(["--check", "--out", str(CRDS)]) == 0, "run `make crds` and commit the result"


def test_drift_is_detected(tmp_path: Any) -> None:
    crdgen.main(["--out", str(tmp_path)])
    path = tmp_path / "fleetlet.io_fleetjobs.yaml"
    path.write_text(path.read_text().replace("minimum: 1", "minimum: 0", 1))
    assert crdgen.main(["--check", "--out", str(tmp_path)]) == 1


def _walk(node: Any, path: str = "") -> list[tuple[str, dict[str, Any]]]:
    found: list[tuple[str, dict[str, Any]]] = []
    if isinstance(node, dict):
        found.append((path, node))
        for k, v in node.items():
            found.extend(_walk(v, f"{path}/{k}"))
    elif isinstance(node, list):
        for i, v in enumerate(node):
            found.extend(_walk(v, f"{path}[{i}]"))
    return found


def test_schemas_are_structural() -> None:
    for name, obj in crdgen.all_crds().items():
        schema = obj["spec"]["versions"][0]["schema"]["openAPIV3Schema"]
        for path, node in _walk(schema):
            assert "$ref" not in node, f"{name}{path}: $ref must be inlined"
            assert "title" not in node, f"{name}{path}"
            assert node.get("additionalProperties") is not False, f"{name}{path}"
            assert node.get("type") != "null", f"{name}{path}: use nullable"
            if "properties" in node:
                assert node.get("type") == "object", f"{name}{path}: objects need type: object"


def test_crds_carry_printer_columns_short_names_status_and_cel() -> None:
    files = {n: yaml.safe_load(t) for n, t in crdgen.render().items() if n.startswith("fleetlet.io_")}
    jobs = files["fleetlet.io_fleetjobs.yaml"]
    version = jobs["spec"]["versions"][0]
    assert version["subresources"] == {"status": {}}
    assert {c["name"] for c in version["additionalPrinterColumns"]} >= {"Phase", "Shards", "Verified", "Age"}
    assert "fj" in jobs["spec"]["names"]["shortNames"]
    spec = version["schema"]["openAPIV3Schema"]["properties"]["spec"]
    rules = [r["rule"] for r in spec["properties"]["verification"]["x-kubernetes-validations"]]
    assert "self.quorum <= self.replicas" in rules
    cars = files["fleetlet.io_vehiclenodes.yaml"]
    assert cars["spec"]["scope"] == "Cluster"
    status = cars["spec"]["versions"][0]["schema"]["openAPIV3Schema"]["properties"]["status"]
    conditions = status["properties"]["conditions"]
    assert conditions["x-kubernetes-list-type"] == "map"
    assert conditions["x-kubernetes-list-map-keys"] == ["type"]


def test_kustomization_lists_every_crd() -> None:
    kust = yaml.safe_load((CRDS / "kustomization.yaml").read_text())
    assert sorted(kust["resources"]) == sorted(p.name for p in CRDS.glob("*.yaml") if p.name != "kustomization.yaml")
    assert "runtimeclass-fleetlet-onnx.yaml" in kust["resources"]
