"""The HTTP layer: thin routers over the job store (see deps.py for what they receive)."""
