"""What one started run holds on a rank (:class:`Session`): config, topology, backend,
transport, engine, watchdog, and where its weights came from. runner.py builds it."""
from __future__ import annotations

from dataclasses import dataclass, field

from ..backend.array import Backend, BackendChoice
from ..core.config import RunConfig
from ..core.progress import SILENT, Reporter
from ..core.topology import Topology
from ..model.checkpoint import LoadStats
from ..parallel.transport import MpiLibrary, TransportChoice
from ..parallel.watchdog import Watchdog
from .engine import Engine


@dataclass
class Session:
    """Everything one rank needs to run: config, topology, backend, transport, engine."""

    config: RunConfig
    topo: Topology
    backend: Backend
    transport: object
    engine: Engine
    library: MpiLibrary
    backend_choice: BackendChoice
    transport_choice: TransportChoice
    watchdog: Watchdog
    peak_flops: float = 0.0
    peak_source: str = ""
    weights_source: str = ""                                   # where the weights came from
    load: LoadStats = field(default_factory=LoadStats)         # this rank's bytes and time
    tracer: object = None                                      # trace.Tracer (--trace)
    progress: Reporter = SILENT                                # rank 0's progress output

    def close(self) -> None:
        self.transport.free()
        self.topo.free()
