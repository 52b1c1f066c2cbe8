"""Node state on disk: schema v1/v2 (pure), the crash-safe v1 → v2 migration, atomic
writes, the state-dir lock and the kept-current v2 state file."""
