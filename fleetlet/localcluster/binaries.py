"""Locate the control-plane binaries, building them once (cached outside the repo) when missing.

Order: ``$FLEETLET_K8S_BIN`` (a directory holding kube-apiserver, kube-scheduler, kube-controller-manager, kubectl
and etcd), else the cache filled by ``build_control_plane.sh`` (pinned versions live in that script only).
"""

from __future__ import annotations

import logging
import os
import subprocess
from dataclasses import dataclass
from pathlib import Path

log = logging.getLogger(__name__)

SCRIPT = Path(__file__).with_name("build_control_plane.sh")
NAMES = ("etcd", "kube-apiserver", "kube-scheduler", "kube-controller-manager", "kubectl")


class BinariesError(RuntimeError):
    pass


@dataclass(frozen=True)
class Binaries:
    directory: Path

    def __getitem__(self, name: str) -> str:
        if name not in NAMES:
            raise KeyError(name)
        return str(self.directory / name)

    @property
    def kubectl(self) -> str:
        return self["kubectl"]

    def missing(self) -> list[str]:
        return [n for n in NAMES if not os.access(self.directory / n, os.X_OK)]


def find_binaries(build: bool = True) -> Binaries:
    """The binaries to run; builds them through the Go module proxy when ``build`` and they are absent."""
    env_dir = os.environ.get("FLEETLET_K8S_BIN")
    if env_dir:
        b = Binaries(Path(env_dir))
        if b.missing():
            raise BinariesError(f"FLEETLET_K8S_BIN={env_dir} lacks {', '.join(b.missing())}")
        return b
    # The script answers instantly (prints the cached bin dir) when the pinned build is already there.
    args = ["bash", str(SCRIPT)]
    if not build:
        args.append("--check")
    try:
        out = subprocess.run(args, check=True, stdout=subprocess.PIPE, text=True).stdout.strip()
    except subprocess.CalledProcessError as exc:
        raise BinariesError(
            "building the control plane failed (see the output above); "
            "run `make control-plane` to retry, or set FLEETLET_K8S_BIN to a directory with the binaries"
        ) from exc
    b = Binaries(Path(out.splitlines()[-1]))
    if b.missing():
        raise BinariesError(f"{b.directory} lacks {', '.join(b.missing())} after the build")
    return b
