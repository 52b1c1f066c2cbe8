"""Host names, IP addresses and `HOST:PORT`, as peers.yml, annad.yml and flags write them."""

from __future__ import annotations

import ipaddress
import re

from ._exceptions import ConfigError

_HOST_LABEL_RE = re.compile(r"^[A-Za-z0-9_]([A-Za-z0-9_-]{0,61}[A-Za-z0-9_])?$")
_PORT_RE = re.compile(r"^[0-9]{1,5}$")


def is_hostname(text: str) -> bool:
    if not 1 <= len(text) <= 253:
        return False
    labels = text[:-1].split(".") if text.endswith(".") else text.split(".")
    return all(_HOST_LABEL_RE.fullmatch(label) for label in labels)


def is_ipv6(text: str) -> bool:
    try:
        ipaddress.IPv6Address(text)
    except ValueError:
        return False
    return True


def is_address(text: str) -> bool:
    """A hostname, or an IPv4 or IPv6 address (without brackets)."""
    if is_hostname(text):
        return True
    try:
        ipaddress.ip_address(text)
    except ValueError:
        return False
    return True


def unbracketed(text: str) -> str:
    """`[::1]` as `::1`; anything else as it is."""
    if text.startswith("[") and text.endswith("]") and is_ipv6(text[1:-1]):
        return text[1:-1]
    return text


def parse_port(text: str) -> int | None:
    if not _PORT_RE.fullmatch(text):
        return None
    port = int(text)
    return port if 1 <= port <= 65535 else None


def parse_host_port(text: str) -> tuple[str, int]:
    """`HOST:PORT`, `[IPv6]:PORT` or `:PORT` (all interfaces) as (host, port)."""
    if not isinstance(text, str):
        raise ConfigError(f"expected HOST:PORT, got {text!r}")
    value = text.strip()
    expected = f"expected HOST:PORT (e.g. 0.0.0.0:8001 or [::1]:8001), got {text!r}"
    if value.startswith("["):
        end = value.find("]")
        if end < 0 or value[end + 1 : end + 2] != ":":
            raise ConfigError(expected)
        host, port_text = value[1:end], value[end + 2 :]
        if not is_ipv6(host):
            raise ConfigError(f"{host!r} is not an IPv6 address, in {text!r}")
    else:
        host, separator, port_text = value.rpartition(":")
        if not separator:
            raise ConfigError(expected)
        if ":" in host:
            raise ConfigError(f"IPv6 addresses need brackets ([::1]:8001), got {text!r}")
        host = host or "0.0.0.0"
        if not is_address(host):
            raise ConfigError(f"{host!r} is not a host name or IP address, in {text!r}")
    port = parse_port(port_text)
    if port is None:
        raise ConfigError(f"port must be an integer 1..65535, in {text!r}")
    return host, port
