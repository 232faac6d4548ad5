"""TLS termination with SNI certificate selection (ssl.SSLContext.sni_callback).

Module config ``tls.certificates`` lists ``{server_names: [...], cert_file, key_file}`` (or
``cert_pem``/``key_pem`` inline). The first certificate is the default for clients without SNI
or with an unknown name. Names may be exact or ``*.example.com`` wildcards.
"""

from __future__ import annotations

import os
import ssl
import tempfile
from collections.abc import Mapping, Sequence
from typing import Any


class TlsConfigError(ValueError):
    """Certificates that cannot be loaded."""


def _load(cert: Mapping[str, Any]) -> ssl.SSLContext:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.set_alpn_protocols(["http/1.1"])
    _load_chain(ctx, cert)
    return ctx


def _load_chain(ctx: ssl.SSLContext, cert: Mapping[str, Any]) -> None:
    try:
        if cert.get("cert_file"):
            ctx.load_cert_chain(str(cert["cert_file"]), str(cert.get("key_file") or "") or None)
        elif cert.get("cert_pem"):
            with tempfile.TemporaryDirectory(prefix="alb-tls-") as d:
                cp, kp = os.path.join(d, "cert.pem"), os.path.join(d, "key.pem")
                with open(cp, "w") as f:
                    f.write(str(cert["cert_pem"]))
                with open(os.open(kp, os.O_WRONLY | os.O_CREAT, 0o600), "w") as f:
                    f.write(str(cert.get("key_pem") or ""))
                ctx.load_cert_chain(cp, kp)
        else:
            raise TlsConfigError("certificate needs cert_file/key_file or cert_pem/key_pem")
    except (OSError, ssl.SSLError) as exc:
        raise TlsConfigError(f"cannot load certificate: {exc}") from None


class SniSelector:
    """Holds the per-name contexts; the listener's context calls :meth:`_select` on ClientHello.

    ``update`` swaps the table atomically, so certificates change without rebinding."""

    def __init__(self) -> None:
        self.exact: dict[str, ssl.SSLContext] = {}
        self.wildcard: dict[str, ssl.SSLContext] = {}
        self.default: ssl.SSLContext | None = None
        self.server_context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        self.server_context.minimum_version = ssl.TLSVersion.TLSv1_2
        self.server_context.set_alpn_protocols(["http/1.1"])
        self.server_context.sni_callback = self._select
        self.names: list[str] = []

    @staticmethod
    def compile(
        certs: Sequence[Mapping[str, Any]],
    ) -> tuple[dict[str, ssl.SSLContext], dict[str, ssl.SSLContext], Mapping[str, Any] | None]:
        exact: dict[str, ssl.SSLContext] = {}
        wild: dict[str, ssl.SSLContext] = {}
        for i, c in enumerate(certs):
            if not isinstance(c, Mapping):
                raise TlsConfigError(f"tls.certificates[{i}] must be an object")
            ctx = _load(c)
            names = c.get("server_names") or []
            if isinstance(names, str):
                names = [names]
            for n in names:
                n = str(n).lower().rstrip(".")
                if n.startswith("*."):
                    wild[n[1:]] = ctx
                else:
                    exact[n] = ctx
        return exact, wild, certs[0] if certs else None

    def update(self, certs: Sequence[Mapping[str, Any]]) -> None:
        exact, wild, first = self.compile(certs)
        if first is not None:
            _load_chain(self.server_context, first)
            self.default = self.server_context
        self.exact, self.wildcard = exact, wild
        self.names = sorted(exact) + sorted("*" + w for w in wild)

    @property
    def configured(self) -> bool:
        return bool(self.names) or self.default is not None

    def context_for(self, name: str | None) -> ssl.SSLContext | None:
        if not name:
            return None
        n = name.lower().rstrip(".")
        ctx = self.exact.get(n)
        if ctx is not None:
            return ctx
        dot = n.find(".")
        while dot >= 0:
            ctx = self.wildcard.get(n[dot:])
            if ctx is not None:
                return ctx
            dot = n.find(".", dot + 1)
        return None

    def _select(self, sslobj: ssl.SSLObject, name: str | None, _ctx: ssl.SSLContext) -> None:
        ctx = self.context_for(name)
        if ctx is not None:
            sslobj.context = ctx
        return None
