"""What a module supplies to the shared runtime: its data plane and its rules, nothing else.

A module implements :class:`ModuleHooks` (usually by subclassing :class:`BaseModuleHooks`). The
runtime (``module/runtime.py``) owns gRPC, health, registration, heartbeats, desired state, the
admin HTTP endpoint, metrics and shutdown; it calls these hooks at the right moments.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol, runtime_checkable


@dataclass(frozen=True, slots=True)
class BoundAddress:
    host: str
    port: int


@dataclass(slots=True)
class LoadReport:
    """What a module reports in heartbeats, GetStats and /status. Counters are since start."""

    active_connections: int = 0
    total_connections: int = 0
    requests_total: int = 0
    errors_total: int = 0
    bytes_in: int = 0
    bytes_out: int = 0
    latency_p50_ms: float = 0.0
    latency_p95_ms: float = 0.0
    latency_p99_ms: float = 0.0
    custom: dict[str, float] = field(default_factory=dict)


@runtime_checkable
class ModuleHooks(Protocol):
    # Read-only members; a module sets them as plain class attributes.
    @property
    def module_type(self) -> int:
        """``types_pb2.ModuleType`` value, e.g. ``types_pb2.MODULE_TYPE_ALB``."""
        ...

    @property
    def protocols(self) -> Sequence[int]:
        """``types_pb2.Protocol`` values this module serves."""
        ...

    @property
    def default_module_id(self) -> str:
        """The logical module id ("alb", "dblb", ...) used when MODULE_ID is unset."""
        ...

    async def start_data_plane(self) -> BoundAddress:
        """Bind the data listener(s) and start serving. Return the main data address."""
        ...

    async def apply_config(self, snapshot: Mapping[str, Any]) -> list[str]:
        """Validate and apply a desired-state snapshot atomically.

        Return validation errors (the snapshot is then rejected whole and the previous one stays
        in force) or an empty list when it was applied.
        """
        ...

    def load(self) -> LoadReport:
        """Current counters; cheap, called on every heartbeat and scrape."""
        ...

    def routes(self) -> list[dict[str, Any]]:
        """The module's routes in seed 000 form (name, match_rules, backend_config, ...)."""
        ...

    def status(self) -> dict[str, Any]:
        """Module-specific JSON for /status (pools, streams, backends, ...)."""
        ...

    async def stop_accepting(self) -> None:
        """Close the listeners; open connections keep going."""
        ...

    async def drain(self, deadline: float) -> None:
        """Wait for in-flight work until ``deadline`` (loop.time()), then close what is left."""
        ...

    async def check_health(self, deep: bool) -> dict[str, str]:
        """Component -> "ok" or a failure description. Deep checks may touch backends."""
        ...


class BaseModuleHooks:
    """Defaults for the optional hooks; a module overrides what it knows better.

    Optional beyond the protocol: ``extra_addresses() -> Mapping[int, BoundAddress]`` names data
    listeners for particular protocols (the DBLB's MySQL port) that the NLB must use instead of
    the main data address; ``metrics_registry`` adds the module's metrics to ``/metrics``;
    ``servicer_class`` replaces the base ModuleService servicer; ``handoff_factories() ->
    Mapping[int, protocol factory]`` (data port -> the factory of that listener's protocol,
    without PROXY-header parsing) lets a co-located NLB hand connections over when
    ``HANDOFF_PATH`` is set (``marchproxy_common.net.handoff``).
    """

    def extra_addresses(self) -> Mapping[int, BoundAddress]:
        return {}

    module_type: int = 0
    protocols: Sequence[int] = ()
    default_module_id: str = "module"

    def routes(self) -> list[dict[str, Any]]:
        return []

    def status(self) -> dict[str, Any]:
        return {}

    def load(self) -> LoadReport:
        return LoadReport()

    async def check_health(self, deep: bool) -> dict[str, str]:
        return {"data_plane": "ok"}

    async def stop_accepting(self) -> None:
        return None

    async def drain(self, deadline: float) -> None:
        return None
