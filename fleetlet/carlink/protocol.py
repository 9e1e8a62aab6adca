"""The car link's wire schema: every message a car and the shim may exchange, and the one way to parse them.

Each message is a JSON object in one WebSocket text frame: a ``type`` discriminator, camelCase fields, a
sequence number ``seq`` (per connection and direction, strictly increasing, stamped by the sending link) and,
from a car, the car's name ``car`` (which the shim checks against the car's certificate). Shim → car messages
omit the name: it is implied by the connection. Optional fields are left out when empty and heartbeats are
WebSocket ping frames, not JSON, so an idle car costs a few bytes a minute (target ≤ 0.25 kbit/s).

Car → shim: ``hello`` (first message: who the car is, what it offers, which assignments it still holds, so
work resumes after a reconnect or a shim restart), ``telemetry``, ``podStatus``, ``log``, ``pong``.
Shim → car: ``welcome``, ``policy`` (the owner's current rules, right after welcome and whenever they change),
``assign`` (a ``ShardAssignment``, the one shard contract, plus the grant to fetch it), ``stop``, ``ack`` (a final
``podStatus`` is stored in the API: the car may forget the assignment), ``redirect`` (another shim replica serves
this car: dial it), ``ping``, ``error``.

Delivery: the car keeps every assignment and the latest status of each until the shim acks the final one, and
lists what it holds in each hello; the shim acks only after the pod's status is written. So nothing reported is
lost to a dropped link or a crashed shim, and nothing is acted on twice.

This module is pure data. It must never do I/O, never import the shim or the car agent, and never let bytes
from the network become a message except through ``decode``, which bounds their size and reports precisely
why it refused them (``ProtocolError.reason`` / ``.field``).
"""

from __future__ import annotations

from datetime import datetime
from enum import StrEnum
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, TypeAdapter, ValidationError
from pydantic.alias_generators import to_camel

from fleetlet.api.v1alpha1.meta import DnsLabel, Quantity, Sha256
from fleetlet.api.v1alpha1.shard import ShardAssignment, ShardCheckpoint
from fleetlet.api.v1alpha1.vehiclenode import Accelerator, Policy, Telemetry

MAX_MESSAGE_BYTES = 64 * 1024
"""Largest message a link accepts; bigger frames are refused (``Refusal.OVERSIZED``)."""

# A Node name is a DNS-1123 subdomain; the car's certificate CN must be one too.
CarName = Annotated[
    str, Field(min_length=1, max_length=253, pattern=r"^[a-z0-9]([-a-z0-9.]*[a-z0-9])?$")
]
# A pod UID (Kubernetes UIDs are UUIDs; anything of this shape is accepted so tests may use short ones).
Uid = Annotated[str, Field(min_length=1, max_length=64, pattern=r"^[A-Za-z0-9][-A-Za-z0-9_.]*$")]
Seq = Annotated[int, Field(ge=0, le=2**53)]
Phase = Literal["Pending", "Running", "Succeeded", "Failed"]
ItemCount = Annotated[int, Field(ge=0, le=2**53)]
Reason = Annotated[str, Field(min_length=1, max_length=128, pattern=r"^[A-Za-z][A-Za-z0-9]*$")]
Text = Annotated[str, Field(max_length=1024)]
LogLine = Annotated[str, Field(max_length=4096)]


class Refusal(StrEnum):
    """Why a link refused a message: the ``code`` of an ``error`` reply and a metric label."""

    MALFORMED = "malformed"  # not JSON, or not a JSON object
    UNKNOWN_TYPE = "unknownType"  # a ``type`` this side does not accept
    SCHEMA = "schema"  # a field missing, extra or out of range (``field`` says which)
    OVERSIZED = "oversized"  # over the link's message size limit
    WRONG_CAR = "wrongCar"  # names another car than the certificate's
    FOREIGN_ASSIGNMENT = "foreignAssignment"  # about an assignment this car was not given
    OUT_OF_ORDER = "outOfOrder"  # seq not above the previous one, or a second hello
    NOT_HELLO = "notHello"  # the first message of a connection must be hello
    WRONG_REPLICA = "wrongReplica"  # another shim replica serves this car (and its address is not known here)


class ProtocolError(ValueError):
    """A message was refused; ``reason`` is machine-readable, ``field`` names the offending field if any."""

    def __init__(self, reason: Refusal, detail: str, field: str | None = None) -> None:
        super().__init__(f"{reason}: {detail}")
        self.reason = reason
        self.detail = detail
        self.field = field


class _Wire(BaseModel):
    model_config = ConfigDict(
        alias_generator=to_camel, populate_by_name=True, extra="forbid", frozen=True
    )


# ---- shared parts ---------------------------------------------------------------------------------------


Checkpoint = ShardCheckpoint
"""A saved state of an assignment in the artifact store (``sha256``, ``itemsDone``): the shard contract's own."""

# An ONNX Runtime execution provider name, e.g. CPUExecutionProvider, CUDAExecutionProvider.
Provider = Annotated[str, Field(min_length=1, max_length=64, pattern=r"^[A-Za-z][A-Za-z0-9]*$")]
ACCELERATOR_PROVIDERS: tuple[str, ...] = ("TensorrtExecutionProvider", "CUDAExecutionProvider")
"""Providers that run a shard on an accelerator; a car whose hello lists none has no usable accelerator."""


class Capacity(_Wire):
    cpu: Quantity
    memory: Quantity
    accelerators: list[Accelerator] = Field(default_factory=list, max_length=4)


class HeldAssignment(_Wire):
    """An assignment the car still holds when it says hello (running, or finished but not yet reported)."""

    uid: Uid
    phase: Phase
    items_done: ItemCount = 0
    checkpoint: Checkpoint | None = None
    result_digest: Sha256 | None = None


class ContainerState(_Wire):
    """The shard container's state, shaped like Kubernetes' ContainerState (flattened)."""

    state: Literal["waiting", "running", "terminated"]
    exit_code: int | None = Field(default=None, ge=-(2**31), le=2**31 - 1)
    reason: Reason | None = None
    message: Text | None = None
    started_at: datetime | None = None
    finished_at: datetime | None = None


# ---- car → shim -----------------------------------------------------------------------------------------


class _FromCar(_Wire):
    car: CarName
    seq: Seq = 0


class Hello(_FromCar):
    type: Literal["hello"] = "hello"
    agent_version: Annotated[str, Field(min_length=1, max_length=64)]
    runtimes: list[DnsLabel] = Field(max_length=8, description="Runtimes the car offers, e.g. ['onnx'].")
    providers: list[Provider] = Field(
        default_factory=list, max_length=16, description="Execution providers the car's ONNX Runtime offers."
    )
    capacity: Capacity
    assignments: list[HeldAssignment] = Field(default_factory=list, max_length=64)


class TelemetryReport(_FromCar):
    type: Literal["telemetry"] = "telemetry"
    telemetry: Telemetry


class PodStatus(_FromCar):
    type: Literal["podStatus"] = "podStatus"
    uid: Uid
    phase: Phase
    container: ContainerState
    items_done: ItemCount = 0
    checkpoint: Checkpoint | None = None
    result_digest: Sha256 | None = None
    provider: Provider | None = Field(default=None, description="The execution provider that ran the shard.")
    energy_kwh: float = Field(default=0.0, ge=0.0, le=1000.0, description="Work energy metered for it, kWh.")


class Log(_FromCar):
    """Lines of an assignment's log; ``offset`` is the index of the first line since the assignment began."""

    type: Literal["log"] = "log"
    uid: Uid
    offset: ItemCount
    lines: list[LogLine] = Field(min_length=1, max_length=256)


class Pong(_FromCar):
    """Answer to an application-level ``ping`` (latency probes; liveness uses WebSocket pings)."""

    type: Literal["pong"] = "pong"
    echo: Seq


# ---- shim → car -----------------------------------------------------------------------------------------


class _FromShim(_Wire):
    seq: Seq = 0


class Welcome(_FromShim):
    """The shim accepted the hello; ``car`` is the identity it read from the certificate."""

    type: Literal["welcome"] = "welcome"
    car: CarName
    heartbeat_seconds: float = Field(gt=0, le=3600)
    telemetry_refresh_seconds: float = Field(gt=0, le=86400)
    max_message_bytes: int = Field(gt=0, le=16 * 1024 * 1024)


class Grant(_Wire):
    """What lets the car fetch this assignment's artifacts (and nothing else) until it expires."""

    token: Annotated[str, Field(min_length=1, max_length=4096)]
    base_url: Annotated[str, Field(max_length=2048, pattern=r"^https?://")]
    expires_at: datetime | None = None


class Assign(_FromShim):
    """Run ``assignment`` (exactly what the pod carries: ``ShardAssignment.from_pod``) as the pod ``uid``."""

    type: Literal["assign"] = "assign"
    uid: Uid
    namespace: DnsLabel
    name: CarName  # a pod name has the same grammar as a Node name
    assignment: ShardAssignment
    grant: Grant


class Stop(_FromShim):
    type: Literal["stop"] = "stop"
    uid: Uid
    grace_seconds: float = Field(default=30.0, ge=0.0, le=3600.0)
    reason: Reason | None = None


class Ack(_FromShim):
    """The final status of ``uid`` is stored (or the pod is gone): the car may forget the assignment."""

    type: Literal["ack"] = "ack"
    uid: Uid


class Redirect(_FromShim):
    """This shim replica does not serve the car: dial ``url`` (the replica that does) instead."""

    type: Literal["redirect"] = "redirect"
    url: Annotated[str, Field(max_length=2048, pattern=r"^wss?://")]
    replica: int = Field(ge=0, le=10_000)


class OwnerPolicy(_FromShim):
    """The owner's current rules for this car (its VehicleNode spec): the agent enforces them itself."""

    type: Literal["policy"] = "policy"
    policy: Policy
    paused: bool = False
    generation: int = Field(default=0, ge=0)


class Ping(_FromShim):
    type: Literal["ping"] = "ping"


class Error(_FromShim):
    """A message was refused; the connection stays up unless the car keeps misbehaving."""

    type: Literal["error"] = "error"
    code: Refusal
    message: Text
    ref_seq: Seq | None = None


CarMessage = Annotated[Hello | TelemetryReport | PodStatus | Log | Pong, Field(discriminator="type")]
ShimMessage = Annotated[
    Welcome | OwnerPolicy | Assign | Stop | Ack | Redirect | Ping | Error, Field(discriminator="type")
]
Message = Annotated[
    Hello | TelemetryReport | PodStatus | Log | Pong
    | Welcome | OwnerPolicy | Assign | Stop | Ack | Redirect | Ping | Error,
    Field(discriminator="type"),
]

# Immutable parsers, built once (building one costs milliseconds; parsing with one costs microseconds).
_ADAPTERS: dict[str | None, TypeAdapter[Any]] = {
    "car": TypeAdapter(CarMessage),
    "shim": TypeAdapter(ShimMessage),
    None: TypeAdapter(Message),
}


def encode(message: BaseModel) -> str:
    """The compact JSON text of a message (camelCase, empty optionals left out)."""
    return message.model_dump_json(by_alias=True, exclude_none=True)


def decode(
    raw: bytes | str, max_bytes: int = MAX_MESSAGE_BYTES, *, sender: Literal["car", "shim"] | None = None
) -> Any:
    """Parse one message; ``sender`` restricts it to what a car (or the shim) may send.

    Returns a ``Message`` (a ``CarMessage`` or ``ShimMessage`` when ``sender`` is given). Raises
    ``ProtocolError`` with reason OVERSIZED, MALFORMED, UNKNOWN_TYPE or SCHEMA (``field`` set to the dotted
    camelCase path of the first bad field).
    """
    size = len(raw)
    if isinstance(raw, str) and size <= max_bytes < 4 * size:
        size = len(raw.encode("utf-8", "surrogatepass"))
    if size > max_bytes:
        raise ProtocolError(Refusal.OVERSIZED, f"message of {size} bytes is over the limit of {max_bytes}")
    try:
        return _ADAPTERS[sender].validate_json(raw)
    except ValidationError as exc:
        raise _refusal(exc, sender) from None


def _refusal(exc: ValidationError, sender: str | None) -> ProtocolError:
    err = exc.errors(include_url=False, include_input=False)[0]
    kind, loc, ctx = err["type"], err["loc"], err.get("ctx") or {}
    if kind == "json_invalid":
        return ProtocolError(Refusal.MALFORMED, f"not valid JSON: {ctx.get('error', err['msg'])}")
    if kind in ("model_attributes_type", "model_type", "dict_type") and not loc:
        return ProtocolError(Refusal.MALFORMED, "a message must be a JSON object")
    if kind == "union_tag_invalid":
        side = f"a {sender}" if sender else "either side"
        return ProtocolError(
            Refusal.UNKNOWN_TYPE, f"type {ctx.get('tag')!r} is not a message {side} may send", "type"
        )
    if kind == "union_tag_not_found":
        return ProtocolError(Refusal.SCHEMA, "the message has no 'type' field", "type")
    path = ".".join(str(p) for p in loc[1:])  # loc[0] is the message type
    where = f"{loc[0]}.{path}" if path else str(loc[0])
    return ProtocolError(Refusal.SCHEMA, f"{where}: {err['msg']}", path or None)
