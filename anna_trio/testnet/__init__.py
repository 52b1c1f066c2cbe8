"""The local 3-node testnet (SPEC §10): its folder, its processes, the seed scenarios.

`layout` makes the folder (keys, a CA, certificates, peers files), `processes` starts,
waits for and stops the annad processes, `scenarios` runs the three seed scenarios
against a running testnet and reports them.
"""

from .layout import (
    LAYOUT_FILE,
    METRICS_BASE,
    READY_TIMEOUT,
    ROUND_TIMEOUT,
    RPC_BASE,
    SCENARIO_TIMEOUT,
    Layout,
    NodeEndpoint,
    free_layout,
    init,
    node_id,
    peers_yaml,
)
from .processes import annad_command, down, start_node, stop_processes, up, wait_ready
from .scenarios import Cluster, ScenarioFailed, ScenarioResult, run_scenarios, summary_table

__all__ = [
    "LAYOUT_FILE",
    "METRICS_BASE",
    "READY_TIMEOUT",
    "ROUND_TIMEOUT",
    "RPC_BASE",
    "SCENARIO_TIMEOUT",
    "Cluster",
    "Layout",
    "NodeEndpoint",
    "ScenarioFailed",
    "ScenarioResult",
    "annad_command",
    "down",
    "free_layout",
    "init",
    "node_id",
    "peers_yaml",
    "run_scenarios",
    "start_node",
    "stop_processes",
    "summary_table",
    "up",
    "wait_ready",
]
