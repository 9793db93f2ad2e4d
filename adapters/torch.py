"""PyTorch adapter (skeleton): DDP-consistent memories and modules arrive with the torch issue.

The core objects already accept and return ``torch.Tensor`` on any device::

    import clusterlearn as cl
    odc = cl.OnlineDeepClustering(n, c, d, like=torch.empty(0, device="cuda"))
"""
