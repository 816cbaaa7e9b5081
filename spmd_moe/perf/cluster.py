"""The performance model's inputs (perfmodel.py): the cluster (GPUs per node, NVLink and
InfiniBand bandwidth and latency per GPU; :class:`Cluster`, named ones in
:data:`CLUSTERS` or a JSON file) and the kernel rates (:class:`Rates`, defaults from an
H100 until ``--calibration`` replaces them, read from a calibration or bench JSON).
docs/CLUSTER.md describes both.
"""
from __future__ import annotations

import math
import os
from dataclasses import dataclass, field, replace
from typing import Any

from ..core.errors import ConfigError
from ..core.files import read_json

# --- the cluster ---------------------------------------------------------------------


@dataclass(frozen=True)
class Cluster:
    """GPUs per node, and per-GPU, per-direction link bandwidth (bytes/s) and latency (s)
    inside a node (NVLink) and between nodes (the GPU's own InfiniBand NIC)."""

    name: str
    gpus_per_node: int
    intra_bandwidth: float
    intra_latency: float
    inter_bandwidth: float
    inter_latency: float
    nodes: int | None = None
    source: str = ""

    def node_of(self, rank: int) -> int:
        """Ranks fill nodes in order (bin/launch: --map-by ppr:G:node / -ppn G)."""
        return rank // self.gpus_per_node

    def link(self, a: int, b: int) -> tuple[float, float]:
        """(bandwidth, latency) between world ranks ``a`` and ``b``."""
        if self.node_of(a) == self.node_of(b):
            return self.intra_bandwidth, self.intra_latency
        return self.inter_bandwidth, self.inter_latency


CLUSTERS = {
    # docs/CLUSTER.md gives the sources: DGX/HGX H100 (NVLink 4: 18 links x 25 GB/s = 450
    # GB/s per direction per GPU; one ConnectX-7 400 Gb/s NDR NIC per GPU).
    "h100-ib": Cluster("h100-ib", gpus_per_node=8, intra_bandwidth=450e9, intra_latency=3e-6,
                       inter_bandwidth=400e9 / 8, inter_latency=5e-6, nodes=32,
                       source="built-in: HGX H100 8-GPU nodes, NVLink 4, 400 Gb/s NDR per "
                              "GPU (nominal, see docs/CLUSTER.md)"),
}

_CLUSTER_KEYS = {"name", "gpus_per_node", "nodes", "intra_node", "inter_node", "source",
                 "comment"}
_LINK_KEYS = {"bandwidth_gbytes_per_s", "bandwidth_gbits_per_s", "latency_us", "comment"}


def _number(where: str, value: Any, integer: bool = False, minimum: float = 0.0,
            strict: bool = True) -> float:
    ok = isinstance(value, (int, float)) and not isinstance(value, bool)
    if ok and integer:
        ok = float(value).is_integer()
    if ok:
        ok = value > minimum if strict else value >= minimum
    if not ok or not math.isfinite(value):
        kind = "a positive integer" if integer else (
            "a positive number" if strict else f"a number >= {minimum:g}")
        raise ConfigError(where, f"{value!r} must be {kind}")
    return int(value) if integer else float(value)


def cluster_from_dict(data: Any, source: str = "cluster") -> Cluster:
    """A cluster from its JSON form (docs/CLUSTER.md)::

        {"name": "my-cluster", "gpus_per_node": 8, "nodes": 32,
         "intra_node": {"bandwidth_gbytes_per_s": 450, "latency_us": 3},
         "inter_node": {"bandwidth_gbits_per_s": 400, "latency_us": 5}}

    Errors name the field (``cluster.inter_node.latency_us: ...``)."""
    if not isinstance(data, dict):
        raise ConfigError(source, "a cluster description must be a JSON object")
    unknown = sorted(set(data) - _CLUSTER_KEYS)
    if unknown:
        raise ConfigError(f"cluster.{unknown[0]}", f"unknown field; known: "
                                                   f"{', '.join(sorted(_CLUSTER_KEYS))}")
    for key in ("gpus_per_node", "intra_node", "inter_node"):
        if key not in data:
            raise ConfigError(f"cluster.{key}", "missing")
    gpus = _number("cluster.gpus_per_node", data["gpus_per_node"], integer=True)
    nodes = data.get("nodes")
    if nodes is not None:
        nodes = _number("cluster.nodes", nodes, integer=True)
    links = {}
    for section in ("intra_node", "inter_node"):
        link = data[section]
        where = f"cluster.{section}"
        if not isinstance(link, dict):
            raise ConfigError(where, "must be an object with bandwidth_gbytes_per_s (or "
                                     "bandwidth_gbits_per_s) and latency_us")
        unknown = sorted(set(link) - _LINK_KEYS)
        if unknown:
            raise ConfigError(f"{where}.{unknown[0]}", f"unknown field; known: "
                                                       f"{', '.join(sorted(_LINK_KEYS))}")
        given = [k for k in ("bandwidth_gbytes_per_s", "bandwidth_gbits_per_s") if k in link]
        if len(given) != 1:
            raise ConfigError(f"{where}.bandwidth_gbytes_per_s",
                              "give exactly one of bandwidth_gbytes_per_s (GB/s) and "
                              "bandwidth_gbits_per_s (Gb/s)")
        value = _number(f"{where}.{given[0]}", link[given[0]])
        bandwidth = value * 1e9 if given[0] == "bandwidth_gbytes_per_s" else value * 1e9 / 8
        if "latency_us" not in link:
            raise ConfigError(f"{where}.latency_us", "missing")
        latency = _number(f"{where}.latency_us", link["latency_us"], minimum=0.0,
                          strict=False) * 1e-6
        links[section] = (bandwidth, latency)
    name = data.get("name", source)
    if not isinstance(name, str):
        raise ConfigError("cluster.name", f"{name!r} must be a string")
    return Cluster(name, gpus, links["intra_node"][0], links["intra_node"][1],
                   links["inter_node"][0], links["inter_node"][1], nodes,
                   str(data.get("source", f"file {source}")))


def cluster_to_dict(cluster: Cluster) -> dict:
    return {"name": cluster.name, "gpus_per_node": cluster.gpus_per_node,
            "nodes": cluster.nodes, "source": cluster.source,
            "intra_node": {"bandwidth_gbytes_per_s": cluster.intra_bandwidth / 1e9,
                           "latency_us": cluster.intra_latency * 1e6},
            "inter_node": {"bandwidth_gbytes_per_s": cluster.inter_bandwidth / 1e9,
                           "latency_us": cluster.inter_latency * 1e6}}


def load_cluster(name_or_path: str | None) -> Cluster:
    """A built-in cluster by name (``h100-ib``) or a JSON file (through the read door)."""
    if not name_or_path:
        return CLUSTERS["h100-ib"]
    if name_or_path in CLUSTERS:
        return CLUSTERS[name_or_path]
    if not os.path.lexists(name_or_path):
        raise ConfigError("--cluster", f"{name_or_path!r}: not a built-in cluster "
                                       f"({', '.join(CLUSTERS)}) nor a file")
    data = read_json(name_or_path, "--cluster", "config", error=ConfigError)
    return cluster_from_dict(data, name_or_path)


# --- kernel rates --------------------------------------------------------------------

@dataclass(frozen=True)
class Rates:
    """What one device sustains. ``expert_tflops``: the expert FFN (two GEMMs and the
    GELU) as one unit; 0 means "GEMM rate, GELU fused" on the GPU and "GEMM rate plus
    un-fused GELU passes" on NumPy. ``op_us``: fixed cost per array operation (a kernel
    launch, a NumPy call). ``source`` says where each number came from."""

    gemm_tflops: float
    attention_tflops: float
    hbm_gbps: float
    expert_tflops: float = 0.0
    op_us: float = 0.0
    source: dict[str, str] = field(default_factory=dict)

    @property
    def gemm(self) -> float:
        return self.gemm_tflops * 1e12

    @property
    def attention(self) -> float:
        return self.attention_tflops * 1e12

    @property
    def expert(self) -> float:
        return (self.expert_tflops or self.gemm_tflops) * 1e12

    @property
    def hbm(self) -> float:
        return self.hbm_gbps * 1e9


_DEFAULT_SOURCE = "default (H100 SXM bf16 assumption; replace with --calibration)"
# docs/CLUSTER.md: SPEC §7's 790 TFLOP/s GEMM floor; FlashAttention-2/cuDNN-class causal
# attention at Dh=128 (~500 TFLOP/s counting causal FLOPs); 3.35 TB/s HBM3 at ~90%; ~8 us
# per CuPy kernel launch from Python.
DEFAULT_RATES = Rates(gemm_tflops=790.0, attention_tflops=500.0, hbm_gbps=3000.0,
                      expert_tflops=0.0, op_us=8.0,
                      source={k: _DEFAULT_SOURCE for k in
                              ("gemm_tflops", "attention_tflops", "hbm_gbps", "op_us")})
RATE_KEYS = ("gemm_tflops", "attention_tflops", "hbm_gbps", "expert_tflops", "op_us")
# Other spellings of the same rates (all carry their unit, so none can be mistaken).
RATE_ALIASES = {
    "gemm_tflops": ("gemm_tflops", "matmul_tflops", "dense_tflops"),
    "attention_tflops": ("attention_tflops", "attn_tflops", "attn_core_tflops"),
    "hbm_gbps": ("hbm_gbps", "memory_gbps", "hbm_bandwidth_gbps", "memory_bandwidth_gbps"),
    "expert_tflops": ("expert_tflops", "expert_ffn_tflops", "ffn_tflops"),
    "op_us": ("op_us", "launch_us", "op_overhead_us"),
}
# ``spmd-moe bench --json`` (layer step): its per-phase TFLOP/s and the measured matmul peak.
BENCH_PATHS = {
    "gemm_tflops": (("tflops", "attn_qkv"), ("peak", "tflops")),
    "attention_tflops": (("tflops", "attn_core"),),
    "expert_tflops": (("tflops", "experts"),),
}


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _find_key(data: Any, names: tuple[str, ...], depth: int = 0):
    """The first value under one of ``names``, searching nested objects breadth-first;
    (value, dotted path) or None."""
    if not isinstance(data, dict) or depth > 4:
        return None
    for name in names:
        if name in data:
            return data[name], name
    for key, value in data.items():
        found = _find_key(value, names, depth + 1)
        if found is not None:
            return found[0], f"{key}.{found[1]}"
    return None


def rates_from_dict(data: Any, source: str = "calibration", base: Rates = DEFAULT_RATES) -> Rates:
    """Rates from a calibration JSON, tolerant of its layout. In order:

    1. the documented form ``{"rates": {"gemm_tflops": .., "attention_tflops": ..,
       "hbm_gbps": .., ["expert_tflops": .., "op_us": ..]}}`` (bin/calibrate-local writes
       it; a few unit-carrying spellings are accepted, RATE_ALIASES);
    2. ``spmd-moe bench --json`` layer-step output: ``tflops.attn_qkv`` (else the measured
       ``peak.tflops``) as the GEMM rate, ``tflops.attn_core`` as attention,
       ``tflops.experts`` as the expert FFN;
    3. the rate names anywhere else in the document (nested up to 4 levels);
    4. a ``spmd-moe run --report`` JSON: its measured ``peak_tflops`` as the GEMM rate.

    Rates not found keep their defaults; ``source`` says which came from where. A rate that
    is found but not a positive number is refused, naming its path.
    """
    if not isinstance(data, dict):
        raise ConfigError(source, "a calibration must be a JSON object")
    found: dict[str, float] = {}
    sources = dict(base.source)

    def take(key: str, value: Any, path: str) -> None:
        zero_ok = key in ("expert_tflops", "op_us")
        found[key] = _number(f"{source}: {path}", value, minimum=0.0, strict=not zero_ok)
        sources[key] = f"{source}: {path}"

    if "rates" in data:
        if not isinstance(data["rates"], dict):
            raise ConfigError(f"{source}: rates", "must be an object {gemm_tflops, "
                                                  "attention_tflops, hbm_gbps}")
        for key in RATE_KEYS:
            for name in RATE_ALIASES[key]:
                if name in data["rates"]:
                    take(key, data["rates"][name], f"rates.{name}")
                    break
    if isinstance(data.get("tflops"), dict):
        for key, paths in BENCH_PATHS.items():
            for path in paths:
                value = data.get(path[0], {}).get(path[1]) if isinstance(
                    data.get(path[0]), dict) else None
                if key not in found and _is_number(value):
                    take(key, value, ".".join(path))
    for key in RATE_KEYS:
        if key not in found:
            hit = _find_key({k: v for k, v in data.items() if k != "rates"},
                            RATE_ALIASES[key])
            if hit is not None:
                take(key, *hit)
    if "gemm_tflops" not in found and _is_number(data.get("peak_tflops")):
        take("gemm_tflops", data["peak_tflops"], "peak_tflops")
    if not found:
        raise ConfigError(source, "no rate found: expected {\"rates\": {\"gemm_tflops\", "
                                  "\"attention_tflops\", \"hbm_gbps\"}} (docs/CLUSTER.md)")
    return replace(base, **found, source=sources)


def load_rates(path: str | None) -> Rates:
    if not path:
        return DEFAULT_RATES
    return rates_from_dict(read_json(path, "--calibration", "report", error=ConfigError), path)
