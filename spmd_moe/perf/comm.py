"""Communication time in the performance model, from bytes and the cluster's links.

Alltoallv: ``sum_peers alpha + max(intra bytes / B_nvlink, inter bytes / B_ib)``, sends
and receives alike (ranks placed ``r // gpus_per_node``, as bin/launch maps them); ring
allreduce: ``2 (P-1) alpha + bytes_sent / B`` over the ring's slowest link; stage to
stage: ``alpha + bytes / B``.
"""
from __future__ import annotations

import numpy as np

from .cluster import Cluster


def alltoallv_time(cluster: Cluster, ranks: list[int], sent: list[float]) -> float:
    """A balanced Alltoallv among world ``ranks``: rank i sends ``sent[i]`` bytes in all,
    split evenly over its P-1 peers. Each rank pays the latency of every peer and moves its
    NVLink and InfiniBand shares (sent and received) at once; the slowest rank sets the
    time."""
    peers = len(ranks)
    if peers < 2:
        return 0.0
    nodes = np.asarray(ranks) // cluster.gpus_per_node
    same = nodes[:, None] == nodes[None, :]                                   # [P, P]
    intra = same & ~np.eye(peers, dtype=bool)
    inter = ~same
    share = np.asarray(sent, dtype=np.float64) / (peers - 1)                  # [P] per peer
    latency = (intra.sum(axis=1) * cluster.intra_latency
               + inter.sum(axis=1) * cluster.inter_latency)
    moving = np.maximum.reduce([share * intra.sum(axis=1) / cluster.intra_bandwidth,
                                intra @ share / cluster.intra_bandwidth,
                                share * inter.sum(axis=1) / cluster.inter_bandwidth,
                                inter @ share / cluster.inter_bandwidth])
    return float((latency + moving).max())


def allreduce_time(cluster: Cluster, ranks: list[int], sent: float) -> float:
    """Ring allreduce in which each rank sends ``sent`` bytes (2 (P-1)/P of the buffer):
    2 (P-1) steps of the ring's slowest link."""
    peers = len(ranks)
    if peers < 2:
        return 0.0
    one_node = len({cluster.node_of(r) for r in ranks}) == 1
    bandwidth, alpha = ((cluster.intra_bandwidth, cluster.intra_latency) if one_node
                        else (cluster.inter_bandwidth, cluster.inter_latency))
    return 2 * (peers - 1) * alpha + sent / bandwidth


def p2p_time(cluster: Cluster, source: int, dest: int, nbytes: float) -> float:
    bandwidth, alpha = cluster.link(source, dest)
    return alpha + nbytes / bandwidth
