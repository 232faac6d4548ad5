"""Pure routing: model name -> deployment group -> ordered attempt plan. No I/O; clock injected.

A request for ``model`` resolves to a group (exact model_name, then alias, then the most specific
glob pattern among model_names and aliases). The plan lists the group's healthy deployments in
the strategy's order, then those of each fallback group. Deployments in cooldown and those at
their own rpm/tpm are left out. The gateway walks the plan, reporting each outcome back.
"""

from __future__ import annotations

import fnmatch
import random
from collections.abc import Callable
from dataclasses import dataclass, field

from .schema import AilbConfig, Deployment, RouterSettings

#: width of the window that per-deployment rpm/tpm count in
DEPLOYMENT_WINDOW_S = 60.0
#: longest cooldown an upstream's Retry-After can ask for
MAX_RETRY_AFTER_S = 3600.0


@dataclass(slots=True)
class DeploymentState:
    deployment: Deployment
    upstream_model: str
    in_flight: int = 0
    consecutive_fails: int = 0
    cooldown_until: float = 0.0
    latency_ewma: float | None = None
    window_start: float = 0.0
    window_requests: int = 0
    window_tokens: int = 0

    @property
    def key(self) -> str:
        return self.deployment.id or f"{self.deployment.model_name}@{self.deployment.base_url}"


@dataclass(slots=True)
class Group:
    name: str
    members: list[DeploymentState] = field(default_factory=list)
    rr_next: int = 0


def _specificity(pattern: str) -> tuple[int, int]:
    return (-sum(ch not in "*?[]" for ch in pattern), pattern.count("*"))


class Router:
    def __init__(
        self,
        config: AilbConfig,
        *,
        clock: Callable[[], float],
        rng: random.Random | None = None,
    ) -> None:
        self.settings: RouterSettings = config.router_settings
        self._clock = clock
        self._rng = rng or random.Random()
        self.groups: dict[str, Group] = {}
        for i, dep in enumerate(config.model_list):
            group = self.groups.setdefault(dep.model_name, Group(dep.model_name))
            if not dep.id:
                dep = dep.model_copy(update={"id": f"{dep.model_name}#{i}"})
            group.members.append(DeploymentState(dep, dep.model or dep.model_name))
        self.aliases = dict(config.model_aliases)
        patterns = [n for n in self.groups if _is_glob(n)]
        patterns += [a for a in self.aliases if _is_glob(a)]
        self._patterns = sorted(patterns, key=_specificity)

    def public_models(self) -> list[str]:
        names = [n for n in self.groups if not _is_glob(n)]
        names += [a for a in self.aliases if not _is_glob(a)]
        return names

    def resolve(self, model: str) -> str | None:
        if model in self.groups and not _is_glob(model):
            return model
        if model in self.aliases:
            return self.aliases[model]
        for pattern in self._patterns:
            if fnmatch.fnmatchcase(model, pattern):
                return self.aliases.get(pattern, pattern)
        return None

    def upstream_model(self, state: DeploymentState, requested: str) -> str:
        """A wildcard deployment ("openai/*" -> model "*") forwards the matched part."""
        target = state.upstream_model
        if "*" not in target:
            return target
        prefix = state.deployment.model_name.split("*", 1)[0]
        rest = requested[len(prefix) :] if requested.startswith(prefix) else requested
        return target.replace("*", rest, 1)

    def plan(self, group_name: str) -> list[DeploymentState]:
        now = self._clock()
        chain = [group_name]
        chain += self.settings.fallbacks.get(group_name, self.settings.default_fallbacks)
        plan: list[DeploymentState] = []
        seen: set[str] = set()
        for name in chain:
            group = self.groups.get(name)
            if group is None:
                continue
            for st in self._order(group, now):
                if st.key not in seen and self._available(st, now):
                    seen.add(st.key)
                    plan.append(st)
        return plan

    @staticmethod
    def _roll(st: DeploymentState, now: float) -> None:
        if now - st.window_start >= DEPLOYMENT_WINDOW_S:
            st.window_start, st.window_requests, st.window_tokens = now, 0, 0

    def _available(self, st: DeploymentState, now: float) -> bool:
        if st.cooldown_until > now:
            return False
        self._roll(st, now)
        dep = st.deployment
        if dep.rpm is not None and st.window_requests >= dep.rpm:
            return False
        return not (dep.tpm is not None and st.window_tokens >= dep.tpm)

    def _order(self, group: Group, now: float) -> list[DeploymentState]:
        members = group.members
        if len(members) <= 1:
            return list(members)
        strategy = self.settings.strategy
        if strategy == "round_robin":
            start = group.rr_next % len(members)
            group.rr_next += 1
            return members[start:] + members[:start]
        if strategy == "weighted":
            pool = list(members)
            out: list[DeploymentState] = []
            while pool:
                pick = self._rng.choices(pool, weights=[m.deployment.weight for m in pool])[0]
                pool.remove(pick)
                out.append(pick)
            return out
        if strategy == "least_busy":
            return sorted(members, key=lambda m: m.in_flight)
        if strategy == "lowest_latency":
            return sorted(members, key=lambda m: -1.0 if m.latency_ewma is None else m.latency_ewma)
        # cost: cheapest per token first (input + output list price)
        return sorted(members, key=lambda m: m.deployment.price.input + m.deployment.price.output)

    # -- outcomes reported by the gateway ------------------------------------------------------

    def started(self, st: DeploymentState) -> None:
        self._roll(st, self._clock())
        st.in_flight += 1
        st.window_requests += 1

    def succeeded(self, st: DeploymentState, latency_s: float, tokens: int = 0) -> None:
        st.in_flight = max(0, st.in_flight - 1)
        st.consecutive_fails = 0
        st.window_tokens += tokens
        alpha = self.settings.latency_alpha
        prev = st.latency_ewma
        st.latency_ewma = latency_s if prev is None else alpha * latency_s + (1 - alpha) * prev

    def failed(
        self, st: DeploymentState, *, cooldown: bool = True, retry_after: float | None = None
    ) -> None:
        """A failed attempt. ``retry_after`` (seconds, from a 429's Retry-After) cools the
        deployment down for that long at once: the upstream said when it takes requests
        again, so neither allowed_fails nor cooldown_seconds applies."""
        st.in_flight = max(0, st.in_flight - 1)
        if not cooldown:
            return
        if retry_after is not None and retry_after > 0:
            until = self._clock() + min(retry_after, MAX_RETRY_AFTER_S)
            st.cooldown_until = max(st.cooldown_until, until)
            st.consecutive_fails = 0
            return
        st.consecutive_fails += 1
        if st.consecutive_fails >= self.settings.allowed_fails:
            st.cooldown_until = self._clock() + self.settings.cooldown_seconds
            st.consecutive_fails = 0

    def finished_other(self, st: DeploymentState) -> None:
        """The request ended without a verdict on the deployment (client went away, 4xx)."""
        st.in_flight = max(0, st.in_flight - 1)

    def carry_over(self, old: Router) -> None:
        """Keep health and latency of deployments that survive a config change."""
        previous = {st.key: st for g in old.groups.values() for st in g.members}
        for group in self.groups.values():
            for st in group.members:
                prev = previous.get(st.key)
                if prev is not None and prev.deployment == st.deployment:
                    st.cooldown_until = prev.cooldown_until
                    st.latency_ewma = prev.latency_ewma
                    st.consecutive_fails = prev.consecutive_fails


def _is_glob(name: str) -> bool:
    return any(ch in name for ch in "*?[")
