"""clusterlearn: clustering-based self-supervised learning on any array backend."""

__version__ = "0.1.0"
