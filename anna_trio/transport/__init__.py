"""The lean transport of the RPC port: HTTP/1.1 server and client over Trio streams and
the TLS stream under them. It moves bytes and bounds what a connection may take; the
routes, limits and idempotency that use it live in `anna_trio.rpc`."""
