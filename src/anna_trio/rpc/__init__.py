"""Node-to-node RPC: the HTTP server and the peer client."""
