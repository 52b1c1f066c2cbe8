"""A deterministic cluster simulator (FoundationDB's simulation testing, TigerBeetle's
VOPR): N real nodes — engines, stores, peer links, RPC routes — in one Trio process on
MockClock(autojump_threshold=0), a seeded network, disk and nemesis between them, and
the invariants checked after every run. Not shipped: tests only.

Replay a seed: ``PYTHONHASHSEED=0 ANNA_SIM_SEED=<seed> nox -s sim``; with
``ANNA_SIM_TRACE=<dir>`` the run's full trace is written there.
"""
