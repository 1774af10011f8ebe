"""Stand-ins for heavy external systems, used by tests only."""
