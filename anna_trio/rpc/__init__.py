"""The RPC port's routes: parsing, limits, rate limit and idempotency in front of the
node, served by the lean transport (`anna_trio.transport`)."""
