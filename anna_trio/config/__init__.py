"""Configuration, split by job: the YAML-with-line-numbers toolkit (`yamlfile`),
peers.yml — the cluster — (`cluster`), and annad's settings layered flag >
environment > annad.yml > default (`settings`). The command line itself is the CLI's
(cli/annad.py)."""

from .cluster import TLS_REQUIRED_MESSAGE as TLS_REQUIRED_MESSAGE
from .cluster import diff_peers as diff_peers
from .cluster import load_cluster_config as load_cluster_config
from .cluster import self_port_change as self_port_change
from .settings import Settings as Settings
from .settings import load_settings as load_settings
from .settings import resolve_settings as resolve_settings
