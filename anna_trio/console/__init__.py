"""The metrics listener: a quart-trio app on hypercorn with `/metrics`, health, readiness,
failpoints and the read-only operator console.

`make_app` builds the app over a `ConsoleSource` (the node's read-only view; the
daemon's adapter is `node_source.NodeConsoleSource`), `ConsoleServer` serves it.
"""

from .app import make_app as make_app
from .listener import CappedRelay as CappedRelay
from .listener import ConnectionLimits as ConnectionLimits
from .server import ConsoleServer as ConsoleServer
from .source import ConsoleSource as ConsoleSource
