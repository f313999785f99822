"""Server URLs checked in full (scheme, hosts, ports, options) without echoing a password.

Each ``*_problem`` function returns what is wrong with a URL, or None.
"""

from __future__ import annotations

import ipaddress
import re
from urllib.parse import parse_qsl, unquote, urlsplit

__all__ = ["endpoint_problem", "hosts_problem", "postgres_url_problem", "redis_url_problem"]

# One host of a URL: a name or IPv4 address (IPv6 goes in brackets).
_HOST_NAME = re.compile(r"[A-Za-z0-9_]([A-Za-z0-9_.-]*[A-Za-z0-9_])?")
_SSL_MODES = ("disable", "allow", "prefer", "require", "verify-ca", "verify-full")
# Said with every malformed host: the usual cause is a password with one of these in it.
_ENCODE_HINT = "(percent-encode characters such as @ : / # ? in the user name and password)"


def postgres_url_problem(url: str) -> str | None:
    """What is wrong with a Postgres URL as asyncpg reads it, or None.

    ``postgres[ql]://[user[:password]@][host[:port][,host[:port]…]][/database][?…]``;
    no host means the local socket, as with libpq. The answer never quotes the URL.
    """
    scheme, separator, _ = url.partition("://")
    if not separator or scheme.lower() not in ("postgres", "postgresql"):
        return "must start with postgres:// or postgresql://"
    try:
        parts = urlsplit(url)
        query = parse_qsl(parts.query, keep_blank_values=True)
    except ValueError:
        return f"is not a valid URL {_ENCODE_HINT}"
    # asyncpg splits the credentials off at the first '@'.
    hosts = parts.netloc.partition("@")[2] if "@" in parts.netloc else parts.netloc
    problem = hosts_problem(hosts, required=False) if hosts else None
    for key, value in query:
        if key == "port" and not all(_is_port(p) for p in value.split(",")):
            problem = problem or "has a port parameter that is not a number in 1-65535"
        if key == "sslmode" and value not in _SSL_MODES:
            problem = problem or f"has an sslmode that is not one of {', '.join(_SSL_MODES)}"
    return problem


def redis_url_problem(url: str) -> str | None:
    """What is wrong with a ``REDIS_URL`` (a server, a socket, or a cluster's nodes), or None."""
    scheme, separator, _ = url.partition("://")
    scheme = scheme.lower()
    if not separator or scheme not in ("redis", "rediss", "unix", "redis+cluster", "rediss+cluster"):
        return "must start with redis://, rediss://, unix://, redis+cluster:// or rediss+cluster://"
    try:
        parts = urlsplit(url)
    except ValueError:
        return f"is not a valid URL {_ENCODE_HINT}"
    if scheme == "unix":
        return None if parts.path else "unix:// needs the socket's path (unix:///path/to/redis.sock)"
    # redis-py and shared.cache.redisclient split the credentials off at the last '@'.
    hosts = parts.netloc.rpartition("@")[2]
    if "," in hosts and not scheme.endswith("+cluster"):
        return "names several hosts: use redis+cluster:// for a Redis Cluster"
    if scheme.endswith("+cluster"):
        return hosts_problem(hosts, required=True)
    if parts.path.strip("/") and not parts.path.strip("/").isdigit():
        return "has a path that is not a database number (redis://host:6379/0)"
    return hosts_problem(hosts, required=True)


def endpoint_problem(url: str, *, scheme_required: bool) -> str | None:
    """What is wrong with an OTLP endpoint (``http[s]://host[:port][/path]``), or None.

    The gRPC exporter also takes a bare ``host:port``; the HTTP one needs the scheme.
    """
    scheme, separator, rest = url.partition("://")
    if separator and scheme.lower() not in ("http", "https"):
        return "must be an http:// or https:// URL"
    if not separator and scheme_required:
        return "must be an http:// or https:// URL with OTLP over HTTP"
    address = (rest if separator else url).split("/", 1)[0]
    return hosts_problem(address.rpartition("@")[2], required=True)


def hosts_problem(hosts: str, *, required: bool) -> str | None:
    """What is wrong with ``host[:port][,host[:port]…]``, or None (never quoting a part)."""
    specs = hosts.split(",")
    if required and not hosts:
        return "names no host"
    for spec in specs:
        if not spec:
            return "has an empty host in its host list"
        if spec.startswith("["):
            address, _, port = spec[1:].partition("]")
            if not _is_ipv6(address) or (port and not port.startswith(":")):
                return f"has a malformed IPv6 host {_ENCODE_HINT}"
            port = port[1:]
        else:
            name, _, port = spec.partition(":")
            name = unquote(name)
            if not name.startswith("/") and not _HOST_NAME.fullmatch(name):
                return f"has a malformed host name {_ENCODE_HINT}"
        if port and not _is_port(port):
            return "has a port that is not a number in 1-65535"
    return None


def _is_port(text: str) -> bool:
    return text.isdigit() and 0 < int(text) < 65536


def _is_ipv6(text: str) -> bool:
    try:
        ipaddress.IPv6Address(text.split("%")[0])  # a zone ("%eth0") is allowed
    except ValueError:
        return False
    return True
