"""meshd: a gossip-based peer-to-peer WireGuard mesh agent."""

__version__ = "0.1.0"
