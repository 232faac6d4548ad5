"""The AILB request path: auth -> limits -> cache -> routing plan -> provider -> usage.

I/O glue only; the rules live in routing.py, keys.py, limits.py, usage.py and the providers.
Served by the shared small HTTP/1.1 server (``marchproxy_common.http1``: no router, no
middlewares, and no aiohttp in the process), which hands over each request with its body read.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
from collections import deque
from collections.abc import Awaitable, Callable, Coroutine
from dataclasses import dataclass, field
from typing import Any, TypeVar

import structlog

from marchproxy_common.http1 import Answer, Request, Response
from marchproxy_common.tasks import spawn

from .budget import BudgetLedger, Hold
from .cache import ResponseCache, cache_key, cache_scope, cacheable
from .errors import GatewayError, UpstreamError, upstream_to_gateway
from .keys import NANO, KeyInfo, KeyStore
from .limits import Admission, Limiter, rate_headers, refusal
from .providers import PROVIDERS, Provider
from .providers.base import DEFAULT_MAX_UPSTREAM_BODY
from .routing import DeploymentState, Router
from .schema import AilbConfig, Deployment
from .tokens import CHARS_PER_TOKEN, completion_cap, count_prompt, count_text
from .upstream_http import UpstreamPool
from .usage import (
    Metrics,
    Tokens,
    UsageRecord,
    UsageStore,
    cost_nusd,
    worst_case_nusd,
)
from .validation import validate_body

_log = structlog.get_logger("marchproxy.ailb")
T = TypeVar("T")

#: longest backoff between retries of one deployment
MAX_BACKOFF_S = 2.0
#: a budget hold outlives its hop's longest possible run by this much (Redis lease)
HOLD_SLACK_S = 60.0
CACHE_HEADER = "x-marchproxy-cache"
RECENT_LATENCY_SAMPLES = 1024
OVERHEAD_HEADER = "x-marchproxy-overhead-ms"
#: which deployment answered (its id), for debugging routing and fallbacks
DEPLOYMENT_HEADER = "x-marchproxy-deployment"
JSON_CT = "application/json"
ENDPOINTS = {
    "/v1/chat/completions": "chat",
    "/v1/completions": "completions",
    "/v1/embeddings": "embeddings",
    # the same surface without the /v1 prefix, as OpenAI's own SDKs accept for base_url
    "/chat/completions": "chat",
    "/completions": "completions",
    "/embeddings": "embeddings",
}


def _dumps(obj: Any) -> bytes:
    return json.dumps(obj, separators=(",", ":")).encode()


def error_answer(err: GatewayError) -> Response:
    """An error in OpenAI's shape, with its status and headers."""
    return Response(err.body(), status=err.status, content_type=JSON_CT, headers=err.headers)


@dataclass(slots=True)
class Routed:
    """Everything one config version needs; swapped whole by :meth:`Gateway.apply`."""

    config: AilbConfig
    router: Router
    keys: KeyStore
    cache: ResponseCache
    providers: dict[str, Provider]


class Gateway:
    def __init__(
        self,
        *,
        redis: Any | None,
        prefix: str,
        usage: UsageStore,
        metrics: Metrics,
        max_upstream_body: int = DEFAULT_MAX_UPSTREAM_BODY,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.redis = redis
        self.prefix = prefix
        self.usage = usage
        self.metrics = metrics
        self.limiter = Limiter(redis, prefix)
        self.ledger = BudgetLedger(redis, prefix, usage)
        self.max_upstream_body = max_upstream_body
        self.clock = clock
        self._pools: dict[str, UpstreamPool] = {}
        self.routed = self._build(AilbConfig())
        self.requests_total = 0
        self.errors_total = 0
        self.active = 0
        #: durations (s) of the latest answered requests, for the load report's percentiles
        self.recent_latency: deque[float] = deque(maxlen=RECENT_LATENCY_SAMPLES)

    # -- configuration -------------------------------------------------------------------------

    def _pool(self, base_url: str) -> UpstreamPool:
        pool = self._pools.get(base_url)
        if pool is None:
            pool = self._pools[base_url] = UpstreamPool(base_url)
        return pool

    def _build(self, config: AilbConfig) -> Routed:
        router = Router(config, clock=self.clock)
        providers: dict[str, Provider] = {}
        for group in router.groups.values():
            for st in group.members:
                dep = st.deployment
                cls = PROVIDERS[dep.provider]
                providers[st.key] = cls(
                    dep.base_url,
                    dep.resolved_api_key,
                    self._pool(dep.base_url),
                    max_body=self.max_upstream_body,
                )
        return Routed(
            config,
            router,
            KeyStore(config.keys, required=config.keys_required),
            ResponseCache(config.cache, self.redis, self.prefix),
            providers,
        )

    def apply(self, config: AilbConfig) -> None:
        routed = self._build(config)
        routed.router.carry_over(self.routed.router)
        self.routed = routed
        in_use = {dep.base_url for dep in config.model_list}
        for base_url in [u for u in self._pools if u not in in_use]:
            self._pools.pop(base_url).retire()

    async def close(self) -> None:
        for pool in self._pools.values():
            await pool.close()
        self._pools.clear()

    # -- HTTP entry ----------------------------------------------------------------------------

    async def handle(self, request: Request) -> Answer:
        t0 = time.perf_counter()
        self.requests_total += 1
        self.active += 1
        self.metrics.in_flight.inc()
        ctx = _Ctx(t0)
        try:
            path = request.path
            kind = ENDPOINTS.get(path)
            if kind is not None:
                if request.method != "POST":
                    raise GatewayError(405, f"Use POST for {path}", code="method_not_allowed")
                return await self._serve(request, kind, ctx)
            if path in ("/v1/models", "/models") or path.startswith(("/v1/models/", "/models/")):
                return self._models(request, path, ctx)
            if path in ("/v1/key/info", "/key/info"):
                return await self._key_info(request, ctx)
            if path == "/health":
                return Response(b"OK")
            raise GatewayError(
                404, f"Unknown request URL: {request.method} {path}.", code="unknown_url"
            )
        except GatewayError as err:
            self.errors_total += 1
            self.metrics.requests.labels(ctx.group, ctx.provider, str(err.status)).inc()
            resp = error_answer(err)
            resp.headers.update(ctx.extra_headers)
            resp.headers[OVERHEAD_HEADER] = self._overhead(ctx)
            return resp
        except Exception:
            # a bug must still answer in OpenAI's shape, never with a stack trace
            _log.exception("ailb_request_failed", path=request.path)
            internal = GatewayError(
                500,
                "The server had an error while processing your request.",
                type="server_error",
                code="internal_error",
            )
            self.errors_total += 1
            self.metrics.requests.labels(ctx.group, ctx.provider, "500").inc()
            resp = error_answer(internal)
            resp.headers[OVERHEAD_HEADER] = self._overhead(ctx)
            return resp
        finally:
            self.active -= 1
            self.metrics.in_flight.dec()

    def refused(self, status: int) -> None:
        """Count a request the HTTP server refused itself (malformed, too large, too slow)."""
        self.requests_total += 1
        self.errors_total += 1
        self.metrics.requests.labels("", "", str(status)).inc()

    async def _key_info(self, request: Request, ctx: _Ctx) -> Response:
        """The presenting key's own limits, budget and persisted usage totals."""
        key = self.routed.keys.authenticate(
            request.headers.get("Authorization"), request.headers.get("x-api-key")
        )
        try:
            totals = await self.usage.totals(key.key_id)
        except Exception as exc:  # redis/OS errors
            self.metrics.backend_errors.labels("usage").inc()
            _log.warning("ailb_backend_error", what="usage", error=str(exc))
            raise GatewayError(
                503,
                "Usage totals are unavailable right now. Please retry shortly.",
                type="service_unavailable",
                code="usage_unavailable",
                headers={"Retry-After": "1"},
            ) from None
        budget = None if key.budget_nusd is None else key.budget_nusd / NANO
        info = {
            "key": key.key_id,
            "team": key.team,
            "user": key.user,
            "models": list(key.models),
            "rpm": key.rpm,
            "tpm": key.tpm,
            "budget_usd": budget,
            "spend_usd": totals["cost_nusd"] / NANO,
            "usage": totals,
        }
        return self._json(info, ctx, {})

    def _overhead(self, ctx: _Ctx) -> str:
        """The gateway's own time so far, for the header, observed in the histogram too."""
        seconds = ctx.overhead_s(time.perf_counter())
        self.metrics.overhead.observe(seconds)
        return f"{seconds * 1000:.3f}"

    async def _soft(self, what: str, op: Awaitable[T], default: T) -> T:
        """Redis trouble must not take the gateway down: serve, count and log (fail open)."""
        try:
            return await op
        except Exception as exc:  # redis/OS errors; CancelledError is not an Exception
            self.metrics.backend_errors.labels(what).inc()
            _log.warning("ailb_backend_error", what=what, error=str(exc))
            return default

    def _models(self, request: Request, path: str, ctx: _Ctx) -> Response:
        routed = self.routed
        key = routed.keys.authenticate(
            request.headers.get("Authorization"), request.headers.get("x-api-key")
        )
        models = [m for m in routed.router.public_models() if key.allows(m)]
        entries = [
            {"id": m, "object": "model", "created": 0, "owned_by": "marchproxy"} for m in models
        ]
        if path.startswith(("/v1/models/", "/models/")):
            wanted = path.split("/models/", 1)[1]
            for e in entries:
                if e["id"] == wanted:
                    return self._json(e, ctx, {})
            raise GatewayError(
                404, f"The model '{wanted}' does not exist", param="model", code="model_not_found"
            )
        return self._json({"object": "list", "data": entries}, ctx, {})

    def _json(self, obj: Any, ctx: _Ctx, headers: dict[str, str]) -> Response:
        return self._bytes(_dumps(obj), ctx, headers)

    def _bytes(self, body: bytes, ctx: _Ctx, headers: dict[str, str]) -> Response:
        resp = Response(body, content_type=JSON_CT, headers=headers)
        resp.headers[OVERHEAD_HEADER] = self._overhead(ctx)
        return resp

    def _read_json(self, request: Request) -> dict[str, Any]:
        # the server has read the body whole, refusing one over AILB_MAX_BODY_BYTES with 413
        try:
            body = json.loads(request.body)
        except ValueError:
            raise GatewayError(
                400, "We could not parse the JSON body of your request.", code="invalid_json"
            ) from None
        if not isinstance(body, dict):
            raise GatewayError(400, "The request body must be a JSON object.", code="invalid_json")
        return body

    # -- the request path ----------------------------------------------------------------------

    async def _serve(self, request: Request, kind: str, ctx: _Ctx) -> Answer:
        routed = self.routed
        key = routed.keys.authenticate(
            request.headers.get("Authorization"), request.headers.get("x-api-key")
        )
        body = self._read_json(request)
        model = body.get("model")
        if not isinstance(model, str) or not model:
            raise GatewayError(
                400, "you must provide a model parameter", param="model", code="missing_model"
            )
        ctx.model = model
        group = routed.router.resolve(model)
        if group is None:
            raise GatewayError(
                404,
                f"The model `{model}` does not exist or you do not have access to it.",
                param="model",
                code="model_not_found",
            )
        # metrics are labelled by the configured group, never by client-chosen names
        ctx.group = group
        if not key.allows(model):
            raise GatewayError(
                403,
                f"Key {key.key_id} may not use model `{model}`.",
                param="model",
                code="model_not_allowed",
            )
        validate_body(kind, body)
        stream = bool(body.get("stream")) and kind != "embeddings"
        estimated = count_prompt(body)
        admission = await self._soft("limits", self.limiter.admit(key, estimated), None)
        if admission is not None:
            if not admission.allowed:
                raise refusal(key, admission)
            ctx.extra_headers.update(rate_headers(key, admission))

        ckey = None
        if (
            not stream
            and routed.cache.enabled
            and request.headers.get(CACHE_HEADER, "").lower() != "no-cache"
        ):
            settings = routed.cache.settings
            if cacheable(kind, body, settings):
                ckey = cache_key(kind, body, cache_scope(settings, key.key_id, key.team))
            else:
                self.metrics.cache.labels("skipped").inc()
        if ckey is not None:
            cached = await self._soft("cache", routed.cache.get(ckey), None)
            if cached is not None:
                self.metrics.cache.labels("hit").inc()
                self.metrics.requests.labels(ctx.group, "cache", "200").inc()
                hit = UsageRecord(
                    key.key_id, key.team, model, "", "cache", 0, 0, 0, 0, False, cache_hit=True
                )
                await self._soft("usage", self.usage.record(hit), None)
                return self._bytes(cached, ctx, {**ctx.extra_headers, CACHE_HEADER: "hit"})
            self.metrics.cache.labels("miss").inc()

        plan = routed.router.plan(group)
        if not plan:
            raise GatewayError(
                503,
                f"No healthy deployment for model `{model}` (all cooling down or at their limits).",
                type="service_unavailable",
                code="no_healthy_deployment",
                headers={"Retry-After": "1"},
            )
        if stream:
            return await self._stream(request, kind, body, key, plan, estimated, ctx)
        result, st = await self._call(kind, body, key, plan, estimated, ctx)
        raw = getattr(result, "raw", b"")
        out = raw if raw else _dumps(result)
        if ckey is not None:
            await self._soft("cache", routed.cache.put(ckey, out), None)
        headers = dict(ctx.extra_headers)
        headers[DEPLOYMENT_HEADER] = st.key
        if ckey is not None:
            headers[CACHE_HEADER] = "miss"
        self.metrics.requests.labels(ctx.group, st.deployment.provider, "200").inc()
        elapsed = time.perf_counter() - ctx.t0
        self.metrics.latency.labels(ctx.group, st.deployment.provider).observe(elapsed)
        self.recent_latency.append(elapsed)
        return self._bytes(out, ctx, headers)

    async def _reserve(
        self, key: KeyInfo, dep: Deployment, estimated: int, cap: int
    ) -> tuple[bool, Hold | None]:
        """Hold this hop's worst-case cost against the key's budget: (allowed, hold)."""
        amount = worst_case_nusd(dep.price, estimated, cap)
        retries = dep.max_retries
        lease_s = dep.timeout * (retries + 1) + MAX_BACKOFF_S * retries + HOLD_SLACK_S
        try:
            hold = await self.ledger.reserve(key, amount, lease_s)
        except Exception as exc:  # redis/OS errors
            # fail closed: a budget that cannot be read cannot be enforced, and a budget is a
            # promise about money (plain rate limits fail open instead, see _soft)
            self.metrics.backend_errors.labels("budget").inc()
            _log.warning("ailb_backend_error", what="budget", error=str(exc))
            raise GatewayError(
                503,
                f"The budget of key {key.key_id} cannot be checked right now (usage store "
                "unavailable); the request was not sent. Please retry shortly.",
                type="service_unavailable",
                code="budget_unavailable",
                headers={"Retry-After": "1"},
            ) from None
        return hold is not None, hold

    async def _release(self, hold: Hold | None) -> None:
        if hold is not None:
            await self._soft("budget", self.ledger.release(hold), None)

    async def _shielded(self, coro: Coroutine[Any, Any, None], name: str) -> None:
        """Bookkeeping that must run to the end even when the client goes away and the request
        task is cancelled: its own task, awaited through a shield."""
        await asyncio.shield(spawn(coro, name=name))

    async def _attempts(
        self,
        kind: str,
        body: dict[str, Any],
        key: KeyInfo,
        plan: list[DeploymentState],
        estimated: int,
        ctx: _Ctx,
        stream: bool,
    ) -> tuple[Any, DeploymentState, float, Hold | None]:
        """Walk the plan: retries per deployment, then fallbacks. Returns (result, deployment,
        upstream seconds, budget hold). Budgets and TPM are re-checked before every hop; the
        hold of the hop that answered is the caller's to settle."""
        last: UpstreamError | None = None
        budget_refused = False
        budgeted = key.budget_nusd is not None
        cap = completion_cap(kind, body, self.routed.config.budgets.default_max_tokens)
        for hop, st in enumerate(plan):
            if (
                hop > 0
                and last is not None
                and not await self._soft("limits", self.limiter.tokens_fit(key, estimated), True)
            ):
                # replicas may have used the key's tokens while earlier hops failed
                raise refusal(key, Admission(False, 0, key.tpm or 0, 1.0, "tokens"))
            hold: Hold | None = None
            if budgeted:
                allowed, hold = await self._reserve(key, st.deployment, estimated, cap)
                if not allowed:
                    budget_refused = True
                    continue
            try:
                result, up = await self._on_deployment(st, kind, body, ctx, stream)
            except UpstreamError as err:
                last = err  # every try of this deployment failed: the next hop
                if hold is not None:
                    await self._shielded(self._release(hold), "ailb release")
                continue
            except BaseException:
                if hold is not None:
                    await self._shielded(self._release(hold), "ailb release")
                raise
            if hop > 0:
                self.metrics.fallbacks.labels(ctx.group).inc()
            return result, st, up, hold
        if budget_refused:
            # a hop the budget could not pay for was skipped: say so rather than relay an
            # earlier hop's failure (the fallback existed, the key could not afford it)
            detail = f" (after upstream error {last.status})" if last is not None else ""
            raise GatewayError(
                429,
                f"Budget exceeded for key {key.key_id}{detail}.",
                type="insufficient_quota",
                code="budget_exceeded",
            )
        if last is None:
            raise GatewayError(
                503,
                "No deployment could take the request.",
                type="service_unavailable",
                code="no_healthy_deployment",
            )
        raise upstream_to_gateway(last)

    async def _on_deployment(
        self, st: DeploymentState, kind: str, body: dict[str, Any], ctx: _Ctx, stream: bool
    ) -> tuple[Any, float]:
        """One deployment with its retries: (result, upstream seconds). Raises the last
        retryable UpstreamError when every try failed, GatewayError for a final answer."""
        routed = self.routed
        dep = st.deployment
        provider = routed.providers[st.key]
        upstream_model = routed.router.upstream_model(st, ctx.model)
        ctx.provider = dep.provider
        attempt = 0
        while True:
            routed.router.started(st)
            t_up = time.perf_counter()
            try:
                result = await self._invoke(
                    provider, kind, body, upstream_model, dep.timeout, stream
                )
            except UpstreamError as err:
                ctx.upstream_s += time.perf_counter() - t_up
                reason = "timeout" if err.status == 504 else str(err.status)
                self.metrics.upstream_errors.labels(dep.provider, st.key, reason).inc()
                if not err.retryable:
                    routed.router.finished_other(st)
                    raise upstream_to_gateway(err) from None
                # a 429 that says when to come back: no retry here before then
                wait = err.retry_after if err.status == 429 and err.retry_after else None
                if attempt < dep.max_retries and wait is None:
                    routed.router.finished_other(st)
                    delay = routed.router.settings.retry_backoff_seconds * (2**attempt)
                    await asyncio.sleep(min(MAX_BACKOFF_S, delay))
                    attempt += 1
                    continue
                routed.router.failed(st, retry_after=wait)
                raise
            except BaseException:
                routed.router.finished_other(st)
                raise
            up = time.perf_counter() - t_up
            ctx.upstream_s += up
            return result, up

    async def _invoke(
        self,
        provider: Provider,
        kind: str,
        body: dict[str, Any],
        model: str,
        timeout_s: float,
        stream: bool,
    ) -> Any:
        if stream:
            opener = provider.chat_stream if kind == "chat" else provider.completions_stream
            chunks = await opener(body, model, timeout_s)
            # wait for the first chunk here (the stall watchdog bounds the wait), so a stall or
            # an error before it can still fall back: nothing has reached the client yet
            try:
                first = await anext(chunks)
            except StopAsyncIteration:
                first = []
            except UpstreamError as err:
                await chunks.aclose()
                raise UpstreamError(
                    err.status, err.message, retryable=True, body=err.body
                ) from None
            except BaseException:
                await chunks.aclose()
                raise
            return first, chunks
        if kind == "chat":
            return await provider.chat(body, model, timeout_s)
        if kind == "completions":
            return await provider.completions(body, model, timeout_s)
        return await provider.embeddings(body, model, timeout_s)

    async def _call(
        self,
        kind: str,
        body: dict[str, Any],
        key: KeyInfo,
        plan: list[DeploymentState],
        estimated: int,
        ctx: _Ctx,
    ) -> tuple[dict[str, Any], DeploymentState]:
        result, st, up, hold = await self._attempts(kind, body, key, plan, estimated, ctx, False)
        tokens = _usage_tokens(result.get("usage"))
        is_estimate = tokens is None
        if tokens is None:
            choices = result.get("choices")
            text = "".join(_choice_text(c) for c in choices) if isinstance(choices, list) else ""
            tokens = Tokens(estimated, count_text(text))
        # the answer is in: the deployment is done and the tokens are spent, whatever the
        # client does next (it may go away now and cancel this task; the settle runs on)
        self.routed.router.succeeded(st, up, tokens.prompt + tokens.completion)
        await self._settle_protected(key, st, tokens, is_estimate, ctx, hold)
        return result, st

    async def _settle_protected(
        self,
        key: KeyInfo,
        st: DeploymentState,
        tokens: Tokens,
        estimated: bool,
        ctx: _Ctx,
        hold: Hold | None,
    ) -> None:
        """Settle so that a client going away cannot interrupt it. Without Redis the settle
        never suspends (unless the usage log is full), and a cancel can only land at a
        suspension point: it is awaited directly, saving a task per request."""
        settle = self._settle(key, st, tokens, estimated, ctx, hold)
        if self.redis is None and not self.usage.may_wait():
            await settle
        else:
            await self._shielded(settle, "ailb settle")

    async def _settle(
        self,
        key: KeyInfo,
        st: DeploymentState,
        tokens: Tokens,
        estimated: bool,
        ctx: _Ctx,
        hold: Hold | None,
    ) -> None:
        """Charge the actual cost, then give back the hop's budget hold (in that order: a
        concurrent reservation sees the spend before the hold goes)."""
        await self._account(key, st, tokens, estimated, ctx)
        await self._release(hold)

    async def _account(
        self,
        key: KeyInfo,
        st: DeploymentState,
        t: Tokens,
        estimated: bool,
        ctx: _Ctx,
    ) -> None:
        dep = st.deployment
        cost = cost_nusd(dep.price, t.prompt, t.completion, t.cached, t.cache_write)
        rec = UsageRecord(
            key.key_id,
            key.team,
            ctx.model,
            st.key,
            dep.provider,
            t.prompt,
            t.completion,
            t.cached,
            cost,
            estimated,
            cache_write_tokens=t.cache_write,
        )
        await self._soft("usage", self.usage.record(rec), None)
        await self._soft("limits", self.limiter.add_tokens(key, t.prompt + t.completion), None)
        m = self.metrics
        m.tokens.labels(ctx.group, dep.provider, "prompt").inc(t.prompt)
        m.tokens.labels(ctx.group, dep.provider, "completion").inc(t.completion)
        if t.cached:
            m.tokens.labels(ctx.group, dep.provider, "cached").inc(t.cached)
        if t.cache_write:
            m.tokens.labels(ctx.group, dep.provider, "cache_write").inc(t.cache_write)
        if cost:
            m.cost.labels(ctx.group).inc(cost / 1e9)

    async def _stream(
        self,
        request: Request,
        kind: str,
        body: dict[str, Any],
        key: KeyInfo,
        plan: list[DeploymentState],
        estimated: int,
        ctx: _Ctx,
    ) -> Answer:
        (first, chunks), st, to_first_chunk, hold = await self._attempts(
            kind, body, key, plan, estimated, ctx, True
        )
        want_usage = bool((body.get("stream_options") or {}).get("include_usage"))
        provider = st.deployment.provider
        tally = _StreamTally(want_usage)
        status = "499"  # until the stream ends well or the upstream fails: the client left
        t_first: float | None = None
        renewed = time.perf_counter()
        try:
            # inside the try: whatever happens from here on, the upstream is closed and the
            # usage settled below
            resp = request.stream(
                content_type="text/event-stream",
                headers={
                    "Cache-Control": "no-cache",
                    **ctx.extra_headers,
                    DEPLOYMENT_HEADER: st.key,
                    OVERHEAD_HEADER: self._overhead(ctx),
                },
            )
            batch: list[dict[str, Any]] | None = first
            while batch is not None:
                out = tally.frame(batch)
                if out:
                    await resp.write(out)
                    if t_first is None:
                        t_first = time.perf_counter()
                        self.metrics.ttft.labels(ctx.group, provider).observe(t_first - ctx.t0)
                if hold is not None and time.perf_counter() - renewed > hold.lease_s / 2:
                    renewed = time.perf_counter()  # a long stream keeps its budget hold
                    await self._soft("budget", self.ledger.renew(hold), None)
                try:
                    batch = await anext(chunks)
                except StopAsyncIteration:
                    batch = None
            await resp.write(b"data: [DONE]\n\n")
            status = "200"
        except UpstreamError as err:
            # headers are out: tell the client in-band, as OpenAI does, and stop
            self.metrics.upstream_errors.labels(provider, st.key, "stream").inc()
            answer = upstream_to_gateway(err)
            status = str(answer.status)  # the upstream failed (502; 504 for a stall)
            with contextlib.suppress(ConnectionError):
                await resp.write(b"data: " + answer.body() + b"\n\n")
        except ConnectionError:
            pass  # the client went away; closing the upstream below cancels it
        finally:
            await chunks.aclose()
            tokens = _usage_tokens(tally.usage)
            est = tokens is None
            if tokens is None:
                tokens = Tokens(estimated, -(-tally.completion_chars // CHARS_PER_TOKEN))
            await self._settle_protected(key, st, tokens, est, ctx, hold)
            self.metrics.requests.labels(ctx.group, provider, status).inc()
            elapsed = time.perf_counter() - ctx.t0
            self.metrics.latency.labels(ctx.group, provider).observe(elapsed)
            self.recent_latency.append(elapsed)
            if status == "200":
                # a stream's latency is its upstream's time to first chunk: the whole
                # duration depends on the answer's length, not on the deployment's speed
                spent = tokens.prompt + tokens.completion
                self.routed.router.succeeded(st, to_first_chunk, spent)
            elif status == "499":
                self.routed.router.finished_other(st)
            else:
                self.routed.router.failed(st)  # counts towards the deployment's cooldown
        # the body ends only now, after the settle: a client that has read the whole stream
        # (clients read to the end, past [DONE]) then sees its usage, spend and tokens counted
        with contextlib.suppress(ConnectionError):
            await resp.finish()
        return resp


@dataclass(slots=True)
class _StreamTally:
    """What a relayed stream carried: the upstream's usage and the completion text length
    (for the estimate when there is no usage)."""

    want_usage: bool
    usage: Any = None
    completion_chars: int = 0

    def frame(self, batch: list[dict[str, Any]]) -> bytes:
        """One network write of SSE events for a batch of chunks (the usage chunk we asked for
        is dropped when the client did not)."""
        out = bytearray()
        for chunk in batch:
            if chunk.get("usage") and not chunk.get("choices"):
                self.usage = chunk["usage"]
                if not self.want_usage:
                    continue
            else:
                choices = chunk.get("choices")
                if isinstance(choices, list):
                    self.completion_chars += sum(len(_delta_text(c)) for c in choices)
                if chunk.get("usage"):
                    self.usage = chunk["usage"]
            raw = getattr(chunk, "raw", b"")
            out += b"data: " + (raw or _dumps(chunk)) + b"\n\n"
        return bytes(out)


@dataclass(slots=True)
class _Ctx:
    t0: float
    model: str = ""
    group: str = ""
    provider: str = ""
    upstream_s: float = 0.0
    extra_headers: dict[str, str] = field(default_factory=dict)

    def overhead_s(self, now: float) -> float:
        """Time since the request came in, minus the time spent waiting on upstreams."""
        return max(0.0, now - self.t0 - self.upstream_s)


def _usage_tokens(usage: Any) -> Tokens | None:
    """Tokens from an OpenAI usage object, or None when absent/garbled. Cache writes come as
    ``cache_creation_input_tokens`` (Anthropic's name, which LiteLLM-style gateways also use)."""
    if not isinstance(usage, dict) or usage.get("prompt_tokens") is None:
        return None
    try:
        prompt = int(usage["prompt_tokens"])
        completion = int(usage.get("completion_tokens") or 0)
        details = usage.get("prompt_tokens_details")
        cached = int(details.get("cached_tokens") or 0) if isinstance(details, dict) else 0
        cache_write = int(usage.get("cache_creation_input_tokens") or 0)
    except (TypeError, ValueError):
        return None
    return Tokens(max(0, prompt), max(0, completion), max(0, cached), max(0, cache_write))


def _text_of(part: Any) -> str:
    if not isinstance(part, dict):
        return ""
    text = part.get("content") if "content" in part else part.get("text")
    out = text if isinstance(text, str) else ""
    calls = part.get("tool_calls")
    for call in calls if isinstance(calls, list) else ():
        fn = call.get("function") if isinstance(call, dict) else None
        args = fn.get("arguments") if isinstance(fn, dict) else None
        out += args if isinstance(args, str) else ""
    return out


def _choice_text(choice: Any) -> str:
    if isinstance(choice, dict) and "text" in choice:
        return _text_of(choice)
    return _text_of(choice.get("message")) if isinstance(choice, dict) else ""


def _delta_text(choice: Any) -> str:
    if isinstance(choice, dict) and "text" in choice:
        return _text_of(choice)
    return _text_of(choice.get("delta")) if isinstance(choice, dict) else ""
