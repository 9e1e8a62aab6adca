"""Who is on the other end of a car link: the TLS context that demands a fleet certificate, and revocation.

A car proves its identity with a client certificate signed by the fleet CA: CN = the car's Node name,
O = ``fleetlet:cars``. The TLS layer refuses peers without one (or with one from another CA) before any HTTP
is read; this module then reads the verified certificate and checks the organisation and the revocation set.

It must never accept an unverified certificate, never take a car's identity from anything the car *says*
(only from what the CA signed), and never hold state outside the objects it returns.
"""

from __future__ import annotations

import logging
import ssl
from dataclasses import dataclass, field
from os import PathLike
from typing import Any

from fleetlet.pki import (
    CAR_ORGANIZATION as CAR_ORGANIZATION,  # re-exported: the link's rule, the PKI's constant
)

log = logging.getLogger(__name__)


class CredentialError(Exception):
    """The peer's certificate does not name a car; ``reason`` is a metric label."""

    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(detail)
        self.reason = reason


@dataclass(frozen=True)
class CarIdentity:
    car: str
    serial: int


def server_ssl_context(
    ca_file: str | PathLike[str], cert_file: str | PathLike[str], key_file: str | PathLike[str]
) -> ssl.SSLContext:
    """A TLS 1.3 server context that requires a client certificate signed by the fleet CA."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_3
    ctx.verify_mode = ssl.CERT_REQUIRED
    ctx.load_verify_locations(cafile=ca_file)
    ctx.load_cert_chain(cert_file, key_file)
    # Python's asyncio clients never resume sessions, so tickets would only cost bytes on every (re)connect.
    ctx.num_tickets = 0
    return ctx


def identity_from_peercert(peercert: dict[str, Any] | None) -> CarIdentity:
    """The car a verified peer certificate (``ssl.SSLSocket.getpeercert()``) names, or CredentialError."""
    if not peercert:
        raise CredentialError("noCertificate", "no verified client certificate")
    cns: list[str] = []
    orgs: list[str] = []
    for rdn in peercert.get("subject", ()):
        for key, value in rdn:
            if key == "commonName":
                cns.append(value)
            elif key == "organizationName":
                orgs.append(value)
    if CAR_ORGANIZATION not in orgs:
        raise CredentialError("notACar", f"certificate organisation {orgs} lacks {CAR_ORGANIZATION!r}")
    if len(cns) != 1 or not cns[0]:
        raise CredentialError("badCommonName", f"certificate must have exactly one common name, has {cns}")
    try:
        serial = int(peercert["serialNumber"], 16)
    except (KeyError, ValueError):
        raise CredentialError("badSerial", "certificate has no readable serial number") from None
    return CarIdentity(car=cns[0], serial=serial)


@dataclass
class Revocations:
    """Revoked certificate serial numbers and car names (a car name revokes every certificate it holds).

    Changed only on the event loop. ``LinkServer.revoke`` also closes the car's live connection.
    """

    serials: set[int] = field(default_factory=set)
    cars: set[str] = field(default_factory=set)

    def is_revoked(self, identity: CarIdentity) -> bool:
        return identity.car in self.cars or identity.serial in self.serials


def parse_revocations(configmap: dict[str, Any] | None) -> tuple[set[str], set[int]]:
    """The revoked car names and certificate serials in the revocation ConfigMap (absent: none).

    ``data.cars``: one car name per line; ``data.serials``: one certificate serial per line, hexadecimal
    (as ``openssl x509 -serial`` prints it). Blank lines and ``#`` comments are ignored; a malformed serial is
    logged and skipped, never fatal.
    """
    data = (configmap or {}).get("data") or {}
    cars = {line.strip() for line in data.get("cars", "").splitlines() if line.strip() and not line.startswith("#")}
    serials: set[int] = set()
    for line in data.get("serials", "").splitlines():
        text = line.strip().removeprefix("serial=")
        if not text or text.startswith("#"):
            continue
        try:
            serials.add(int(text.replace(":", ""), 16))
        except ValueError:
            log.warning("car revocation list: %r is not a hexadecimal serial; skipped", text)
    return cars, serials
