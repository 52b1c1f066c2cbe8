"""Per-client token buckets (pure: the clock is passed in)."""

from __future__ import annotations

import math

import attrs


@attrs.define
class _Bucket:
    tokens: float
    stamp: float


class TokenBuckets:
    """`rate` tokens per second, up to `burst`, one bucket per client key."""

    def __init__(self, rate: float, burst: int, max_clients: int = 65_536) -> None:
        self.rate = rate
        self.burst = burst
        self._buckets: dict[str, _Bucket] = {}
        self._max_clients = max_clients

    def allow(self, client: str, now: float) -> float:
        """0.0 when the request may pass, else the seconds until it would."""
        bucket = self._buckets.get(client)
        if bucket is None:
            if len(self._buckets) >= self._max_clients:
                self._evict(now)
            bucket = self._buckets[client] = _Bucket(float(self.burst), now)
        bucket.tokens = min(float(self.burst), bucket.tokens + (now - bucket.stamp) * self.rate)
        bucket.stamp = now
        if bucket.tokens >= 1.0:
            bucket.tokens -= 1.0
            return 0.0
        return (1.0 - bucket.tokens) / self.rate

    def _evict(self, now: float) -> None:
        """Forget clients whose buckets have refilled: they behave like new ones."""
        full_after = self.burst / self.rate
        self._buckets = {k: b for k, b in self._buckets.items() if now - b.stamp < full_after}
        if len(self._buckets) >= self._max_clients:
            self._buckets.clear()


def retry_after_header(seconds: float) -> str:
    return str(max(1, math.ceil(seconds)))
