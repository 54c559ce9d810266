"""``fifo``: first come, first served.

Requests run in arrival order (ties by push order). A request whose model has no free
instance waits without holding back requests for other models. Admission: everything.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

from sage_llm.control_plane.scheduling._queue import QueuedPolicy, QueueEntry, Rank
from sage_llm.control_plane.snapshot import RequestInfo


class FIFOPolicy(QueuedPolicy):
    """Arrival order; the lowest-overhead and fairest policy under light load."""

    name = "fifo"

    @dataclass(frozen=True, slots=True)
    class Params:
        """FIFO has no parameters."""

    def __init__(self, params: FIFOPolicy.Params | None = None) -> None:
        super().__init__()
        self.params = params if params is not None else FIFOPolicy.Params()

    def _place(self, req: RequestInfo) -> tuple[int, float]:
        return 0, req.arrival

    def _rank(self, entry: QueueEntry, now: float) -> Rank:
        return (entry.key, entry.seq)

    def _params_dict(self) -> dict[str, object]:
        return asdict(self.params)


FIFOParams = FIFOPolicy.Params
