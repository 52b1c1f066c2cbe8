"""The metrics listener: a quart-trio app with `/metrics`, health, readiness, failpoints
and the read-only operator console (ARCHITECTURE: console/).

`make_app` builds the app over a `ConsoleSource`, the node's read-only view.
"""

from .app import make_app as make_app
from .source import ConsoleSource as ConsoleSource
