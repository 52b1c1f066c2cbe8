"""anna-trio: the Anna audit-consensus node on Trio."""

__version__ = "0.1.0"
