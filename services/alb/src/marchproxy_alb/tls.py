"""TLS termination with SNI certificate selection (ssl.SSLContext.sni_callback).

Module config ``tls.certificates`` lists ``{server_names: [...], cert_file, key_file}`` (or
``cert_pem``/``key_pem`` inline). The first certificate is the default for clients without SNI
or with an unknown name. Names may be exact or ``*.example.com`` wildcards, which match exactly
one label (RFC 6125 §6.4.3: ``a.example.com``, not ``example.com`` or ``a.b.example.com``).

Loading reads files and parses keys, so :meth:`SniSelector.compile` is meant to run in a thread;
:meth:`SniSelector.install` then swaps the compiled table in with one assignment. The listener's
context holds no certificate itself: its SNI callback hands every handshake (with or without a
name) to one of the loaded contexts.
"""

from __future__ import annotations

import os
import ssl
import tempfile
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
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


@dataclass(frozen=True, slots=True)
class SniTable:
    """Loaded certificates: exact names, one-label wildcards (keyed by the parent domain,
    ``example.com`` for ``*.example.com``) and the default."""

    exact: Mapping[str, ssl.SSLContext] = field(default_factory=dict)
    wildcard: Mapping[str, ssl.SSLContext] = field(default_factory=dict)
    default: ssl.SSLContext | None = None

    @property
    def names(self) -> list[str]:
        return sorted(self.exact) + sorted("*." + w for w in self.wildcard)

    def context_for(self, name: str | None) -> ssl.SSLContext | None:
        """The context for an SNI name, or None when no certificate names it."""
        if not name:
            return None
        n = name.lower().rstrip(".")
        ctx = self.exact.get(n)
        if ctx is not None:
            return ctx
        dot = n.find(".")
        if dot <= 0:
            return None
        return self.wildcard.get(n[dot + 1 :])  # "*" covers exactly the first label


class SniSelector:
    """Holds the loaded table; the listener's context calls :meth:`_select` on ClientHello.

    ``install`` swaps the table atomically, so certificates change without rebinding."""

    def __init__(self) -> None:
        self.table = SniTable()
        self.server_context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        self.server_context.minimum_version = ssl.TLSVersion.TLSv1_2
        self.server_context.set_alpn_protocols(["http/1.1"])
        self.server_context.sni_callback = self._select

    @staticmethod
    def compile(certs: Sequence[Mapping[str, Any]]) -> SniTable:
        """Load every certificate (blocking: file reads and key parsing)."""
        exact: dict[str, ssl.SSLContext] = {}
        wild: dict[str, ssl.SSLContext] = {}
        default: ssl.SSLContext | None = None
        for i, c in enumerate(certs):
            if not isinstance(c, Mapping):
                raise TlsConfigError(f"tls.certificates[{i}] must be an object")
            ctx = _load(c)
            default = default or ctx
            names = c.get("server_names") or []
            if isinstance(names, str):
                names = [names]
            for n in names:
                n = str(n).lower().rstrip(".")
                if n.startswith("*."):
                    wild[n[2:]] = ctx
                else:
                    exact[n] = ctx
        return SniTable(exact, wild, default)

    def install(self, table: SniTable) -> None:
        self.table = table

    @property
    def names(self) -> list[str]:
        return self.table.names

    @property
    def configured(self) -> bool:
        return self.table.default is not None

    def context_for(self, name: str | None) -> ssl.SSLContext | None:
        return self.table.context_for(name)

    def _select(self, sslobj: ssl.SSLObject, name: str | None, _ctx: ssl.SSLContext) -> None:
        table = self.table
        ctx = table.context_for(name) or table.default
        if ctx is not None:
            sslobj.context = ctx
        # else: no certificate at all, and the handshake fails
        return None
