"""The live module-instance table: registration, heartbeats, draining and expiry.

Pure state with an injected clock, so every rule here is tested without an event loop. The gRPC
servicer validates requests and calls in; the data plane reads :meth:`InstanceRegistry.candidates`
and keeps each instance's ``active_connections`` current.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field

from marchproxy.v1 import types_pb2

HEALTHY = types_pb2.HEALTH_STATUS_HEALTHY
DEGRADED = types_pb2.HEALTH_STATUS_DEGRADED
UNHEALTHY = types_pb2.HEALTH_STATUS_UNHEALTHY
DRAINING = types_pb2.HEALTH_STATUS_DRAINING
ROUTABLE_HEALTH = frozenset({HEALTHY, DEGRADED})
KNOWN_HEALTH = frozenset(types_pb2.HealthStatus.values())

DEFAULT_WEIGHT = 100
DEFAULT_DRAIN_TIMEOUT = 30.0

Listener = Callable[[str, "Instance"], None]


class RegistryFull(Exception):
    """More instances than ``max_instances``: the NLB refuses new registrations."""


@dataclass(slots=True)
class Instance:
    instance_id: str
    module_id: str
    module_type: types_pb2.ModuleType.ValueType
    protocols: frozenset[types_pb2.Protocol.ValueType]
    data_host: str
    data_port: int
    grpc_host: str = ""
    grpc_port: int = 0
    version: str = ""
    weight: int = DEFAULT_WEIGHT
    capacity: int = 0
    labels: dict[str, str] = field(default_factory=dict)
    #: data addresses for particular protocols; every other protocol uses data_host/data_port
    addresses: dict[types_pb2.Protocol.ValueType, tuple[str, int]] = field(default_factory=dict)
    health: types_pb2.HealthStatus.ValueType = HEALTHY
    draining: bool = False
    registered_at: float = 0.0
    last_heartbeat: float = 0.0
    drain_deadline: float = 0.0
    health_reason: str = ""
    #: connections the NLB data plane relays to this instance right now
    active_connections: int = 0
    #: connections the NLB has routed to this instance since registration
    routed_total: int = 0
    # load as the module reports it in heartbeats
    reported_connections: int = 0
    cpu_percent: float = 0.0
    memory_bytes: int = 0
    requests_total: int = 0
    requests_per_second: float = 0.0
    errors_total: int = 0
    bytes_in: int = 0
    bytes_out: int = 0
    applied_config_version: int = 0
    rejected_config_version: int = 0
    rejected_reason: str = ""
    heartbeats: int = 0

    @property
    def routable(self) -> bool:
        return self.health in ROUTABLE_HEALTH and not self.draining

    @property
    def data_address(self) -> tuple[str, int]:
        return (self.data_host, self.data_port)

    def address_for(self, protocols: Iterable[types_pb2.Protocol.ValueType]) -> tuple[str, int]:
        """The data address for the first of ``protocols`` with its own, else the default."""
        for p in protocols:
            found = self.addresses.get(p)
            if found is not None:
                return found
        return (self.data_host, self.data_port)


class InstanceRegistry:
    """Module instances keyed by instance id.

    Rules: an instance is routable while healthy (or degraded) and not draining; an instance
    whose last heartbeat is older than ``heartbeat_timeout`` is removed by :meth:`expire`; a
    graceful unregister marks it draining until it unregisters for good, stops heartbeating, or
    its drain deadline passes.
    """

    def __init__(
        self,
        heartbeat_timeout: float,
        clock: Callable[[], float] = time.monotonic,
        *,
        max_instances: int = 10_000,
    ) -> None:
        self.heartbeat_timeout = heartbeat_timeout
        self.max_instances = max_instances
        self._clock = clock
        self._instances: dict[str, Instance] = {}
        self._listeners: list[Listener] = []
        self.generation = 0  # bumps on every membership or routability change

    # -- reads ---------------------------------------------------------------------------------

    def get(self, instance_id: str) -> Instance | None:
        return self._instances.get(instance_id)

    def all(self) -> list[Instance]:
        return list(self._instances.values())

    def __len__(self) -> int:
        return len(self._instances)

    def candidates(self, protocol: int) -> list[Instance]:
        """Routable instances that claim ``protocol``."""
        return [i for i in self._instances.values() if i.routable and protocol in i.protocols]

    def by_module(self, module_id: str) -> list[Instance]:
        return [i for i in self._instances.values() if i.module_id == module_id]

    def find(self, key: str) -> list[Instance]:
        """Instances whose instance id or module id is ``key`` (seed 002 passes either)."""
        inst = self._instances.get(key)
        return [inst] if inst is not None else self.by_module(key)

    # -- writes --------------------------------------------------------------------------------

    def subscribe(self, callback: Listener) -> None:
        """``callback(event, instance)`` for registered, reregistered, unregistered, expired,
        draining and health events."""
        self._listeners.append(callback)

    def register(
        self,
        *,
        module_id: str,
        module_type: types_pb2.ModuleType.ValueType,
        protocols: Iterable[types_pb2.Protocol.ValueType],
        data_host: str,
        data_port: int,
        instance_id: str = "",
        grpc_host: str = "",
        grpc_port: int = 0,
        version: str = "",
        weight: int = DEFAULT_WEIGHT,
        capacity: int = 0,
        labels: Mapping[str, str] | None = None,
        addresses: Mapping[types_pb2.Protocol.ValueType, tuple[str, int]] | None = None,
    ) -> tuple[Instance, bool]:
        """Add or refresh an instance. Returns ``(instance, created)``.

        Registering again with a known instance id (a module whose NLB restarted, or that
        reconnected) refreshes the entry in place and clears draining.
        """
        now = self._clock()
        iid = instance_id or f"{module_id}-{uuid.uuid4().hex[:12]}"
        existing = self._instances.get(iid)
        if existing is None and len(self._instances) >= self.max_instances:
            raise RegistryFull(f"registry holds the maximum of {self.max_instances} instances")
        inst = existing or Instance(
            instance_id=iid,
            module_id=module_id,
            module_type=module_type,
            protocols=frozenset(),
            data_host=data_host,
            data_port=data_port,
            registered_at=now,
        )
        inst.module_id = module_id
        inst.module_type = module_type
        inst.protocols = frozenset(protocols)
        inst.data_host = data_host
        inst.data_port = data_port
        inst.grpc_host = grpc_host
        inst.grpc_port = grpc_port
        inst.version = version
        inst.weight = weight
        inst.capacity = capacity
        inst.labels = dict(labels or {})
        inst.addresses = dict(addresses or {})
        inst.health = HEALTHY
        inst.health_reason = ""
        inst.draining = False
        inst.drain_deadline = 0.0
        inst.last_heartbeat = now
        self._instances[iid] = inst
        self._changed("registered" if existing is None else "reregistered", inst)
        return inst, existing is None

    def heartbeat(
        self,
        instance_id: str,
        *,
        health: types_pb2.HealthStatus.ValueType = types_pb2.HEALTH_STATUS_UNSPECIFIED,
        reported_connections: int = 0,
        requests_total: int = 0,
        cpu_percent: float = 0.0,
        memory_bytes: int = 0,
        requests_per_second: float = 0.0,
        errors_total: int = 0,
        bytes_in: int = 0,
        bytes_out: int = 0,
        applied_config_version: int = 0,
        rejected_config_version: int = 0,
        rejected_reason: str = "",
    ) -> Instance | None:
        """Record a heartbeat; ``None`` when the instance is unknown (it must re-register).

        The caller validates the values (the servicer answers INVALID_ARGUMENT); an unknown
        health value here is a bug and raises ``ValueError`` before anything is stored."""
        if health not in KNOWN_HEALTH:
            raise ValueError(f"unknown health status {health}")
        inst = self._instances.get(instance_id)
        if inst is None:
            return None
        inst.last_heartbeat = self._clock()
        inst.heartbeats += 1
        inst.reported_connections = reported_connections
        inst.requests_total = requests_total
        inst.cpu_percent = cpu_percent
        inst.memory_bytes = memory_bytes
        inst.requests_per_second = requests_per_second
        inst.errors_total = errors_total
        inst.bytes_in = bytes_in
        inst.bytes_out = bytes_out
        if applied_config_version:
            inst.applied_config_version = applied_config_version
        if rejected_config_version:
            inst.rejected_config_version = rejected_config_version
            inst.rejected_reason = rejected_reason
        # A module reports its own health; draining set by the NLB is kept.
        if health and health != inst.health and not inst.draining and health != DRAINING:
            inst.health = health
            self._changed("health", inst)
        return inst

    def set_health(
        self, key: str, health: types_pb2.HealthStatus.ValueType, reason: str = ""
    ) -> list[Instance]:
        """Seed 002 UpdateHealth: ``key`` is an instance id or a module id."""
        if health not in KNOWN_HEALTH:
            raise ValueError(f"unknown health status {health}")
        changed = self.find(key)
        for inst in changed:
            inst.health_reason = reason
            if health == DRAINING:
                self._start_draining(inst, DEFAULT_DRAIN_TIMEOUT)
            elif inst.health != health:
                inst.health = health
                self._changed("health", inst)
        return changed

    def unregister(
        self, instance_id: str, *, graceful: bool, drain_timeout: float = DEFAULT_DRAIN_TIMEOUT
    ) -> Instance | None:
        """Graceful: mark draining (no new connections). Otherwise remove now."""
        inst = self._instances.get(instance_id)
        if inst is None:
            return None
        if graceful:
            self._start_draining(inst, drain_timeout)
        else:
            self._remove(inst, "unregistered")
        return inst

    def expire(self) -> list[Instance]:
        """Remove instances that stopped heartbeating or outlived their drain deadline."""
        now = self._clock()
        gone = [
            i
            for i in self._instances.values()
            if now - i.last_heartbeat > self.heartbeat_timeout
            or (i.draining and i.drain_deadline and now >= i.drain_deadline)
        ]
        for inst in gone:
            self._remove(inst, "expired")
        return gone

    # -- internals -----------------------------------------------------------------------------

    def _start_draining(self, inst: Instance, drain_timeout: float) -> None:
        if inst.draining:
            return
        inst.draining = True
        inst.health = DRAINING
        inst.drain_deadline = self._clock() + max(drain_timeout, 0.0)
        self._changed("draining", inst)

    def _remove(self, inst: Instance, event: str) -> None:
        self._instances.pop(inst.instance_id, None)
        self._changed(event, inst)

    def _changed(self, event: str, inst: Instance) -> None:
        self.generation += 1
        for cb in self._listeners:
            cb(event, inst)
