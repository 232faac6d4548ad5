"""Registry objects to protobuf messages."""

from __future__ import annotations

import time

from google.protobuf.timestamp_pb2 import Timestamp

from marchproxy.v1 import nlb_pb2, types_pb2
from marchproxy_nlb.registry.table import Instance


def wall_timestamp(monotonic_value: float, now_monotonic: float) -> Timestamp:
    """Convert a registry (monotonic) time to a wall-clock Timestamp."""
    ts = Timestamp()
    ts.FromNanoseconds(int((time.time() - (now_monotonic - monotonic_value)) * 1e9))
    return ts


def instance_pb(inst: Instance, now: float) -> types_pb2.ModuleInstance:
    return types_pb2.ModuleInstance(
        instance_id=inst.instance_id,
        module_id=inst.module_id,
        module_type=inst.module_type,
        data_address=types_pb2.Address(host=inst.data_host, port=inst.data_port),
        grpc_address=types_pb2.Address(host=inst.grpc_host, port=inst.grpc_port),
        health=inst.health,
        active_connections=inst.active_connections,
        version=inst.version,
        protocols=sorted(inst.protocols),
        weight=inst.weight,
        capacity=inst.capacity,
        labels=inst.labels,
        registered_at=wall_timestamp(inst.registered_at, now),
        last_heartbeat=wall_timestamp(inst.last_heartbeat, now),
        draining=inst.draining,
        cpu_percent=inst.cpu_percent,
        memory_bytes=inst.memory_bytes,
        requests_total=inst.requests_total,
        applied_config_version=inst.applied_config_version,
        protocol_addresses=[
            types_pb2.ProtocolAddress(
                protocol=p,
                address=types_pb2.Address(host=host, port=port),
            )
            for p, (host, port) in sorted(inst.addresses.items())
        ],
    )


def stats_pb(inst: Instance, now: float) -> types_pb2.ModuleStats:
    return types_pb2.ModuleStats(
        module_id=inst.module_id,
        instance_id=inst.instance_id,
        total_requests=inst.requests_total,
        active_connections=max(inst.active_connections, inst.reported_connections),
        total_connections=inst.routed_total,
        errors_total=inst.errors_total,
        requests_per_second=inst.requests_per_second,
        cpu_percent=inst.cpu_percent,
        memory_bytes=inst.memory_bytes,
        bytes_in=inst.bytes_in,
        bytes_out=inst.bytes_out,
        uptime_seconds=max(0.0, now - inst.registered_at),
    )


def load_info_pb(inst: Instance, total_active: int) -> nlb_pb2.LoadInfo:
    if inst.capacity:
        score = min(1.0, inst.active_connections / inst.capacity)
    else:
        score = inst.active_connections / total_active if total_active else 0.0
    return nlb_pb2.LoadInfo(
        instance_id=inst.instance_id,
        module_id=inst.module_id,
        active_connections=inst.active_connections,
        cpu_percent=inst.cpu_percent,
        memory_bytes=inst.memory_bytes,
        requests_per_second=inst.requests_per_second,
        load_score=score,
        weight=inst.weight,
    )


def balance_score(loads: list[int]) -> float:
    """1.0 when load is spread evenly, towards 0 when one instance carries everything."""
    if len(loads) < 2 or not sum(loads):
        return 1.0
    mean = sum(loads) / len(loads)
    return max(0.0, 1.0 - (max(loads) - mean) / sum(loads))
