"""Expert weights this worker holds, per expert-map version.

Legend: L MoE layers, S slots per worker, n tokens, K top-k, D hidden.

``install(map)`` makes the map's slots for this worker resident: for each MoE layer whose
slot→expert row equals one already held, the tensors are shared (a routing-only change
costs nothing); in other layers, experts already held in some slot are copied from there and
only the rest are read from the checkpoint. Several
versions can be held at once (make-before-break: v serves while v+1 is prepared);
``retire_below(v)`` drops older ones. ``compute`` is the data plane's ``ExpertCompute``: it
serves a batch routed with ``header.map_version`` or raises ``StaleMapVersion``; its inputs are
moved to this worker's device and the result back to where they came from (a CUDA expert worker
on the gloo data plane receives and replies in host memory).
"""

from __future__ import annotations

import logging
import threading

import torch

from epserve.expert_map import ExpertMap
from epserve.model_config import ModelSpec
from epserve.models.expert_side import ExpertSlots, check_moe_runner, load_expert_slots
from epserve.moe_runner import MoERunner
from epserve.weights import CheckpointReader
from epserve.expert_worker.load_pacer import LoadPacer

logger = logging.getLogger(__name__)


class ExpertStore:
    def __init__(self, spec: ModelSpec, reader: CheckpointReader, worker_id: str, runner: MoERunner,
                 dtype: torch.dtype, device: torch.device | str = "cpu") -> None:
        check_moe_runner(spec, runner)                  # GPT-OSS's experts: the torch runner only
        self.spec, self.reader, self.worker_id, self.runner = spec, reader, worker_id, runner
        self.dtype, self.device = dtype, device
        self._versions: dict[int, ExpertSlots] = {}
        self._lock = threading.Lock()

    @property
    def versions(self) -> list[int]:
        with self._lock:
            return sorted(self._versions)

    def install(self, expert_map: ExpertMap, pacer: LoadPacer | None = None) -> ExpertSlots:
        """Make ``expert_map``'s slots for this worker resident (idempotent per version);
        ``pacer`` spreads the loading over time (live changes)."""
        with self._lock:
            if expert_map.version in self._versions:
                return self._versions[expert_map.version]
            held = list(self._versions.values())
        # a worker that owns no slots yet (it joined after this map was made) holds nothing in it
        slots = expert_map.slots_of_worker(self.worker_id) if self.worker_id in expert_map.slot_owners else range(0)
        wanted = expert_map.phy2log[:, slots.start:slots.stop]                       # [L, S]
        reuse = {}
        for layer in range(wanted.shape[0]):
            for old in held:
                if torch.equal(old.slot_experts[layer], wanted[layer]):
                    reuse[layer] = old.layer_tensors(layer)
                    break
        missing = [layer for layer in range(wanted.shape[0]) if layer not in reuse]
        if missing:
            to_load = wanted.clone()
            to_load[list(reuse)] = -1                                                # skip reused layers
            if pacer is not None:
                pacer.start()
            loaded = load_expert_slots(self.spec, self.reader, to_load, self.dtype, self.device, held,
                                       after_each=pacer.tick if pacer is not None else None)
        layers = [reuse[l] if l in reuse else loaded.layer_tensors(l) for l in range(wanted.shape[0])]
        installed = ExpertSlots.from_layers(wanted.clone(), layers, self.spec)
        with self._lock:
            self._versions[expert_map.version] = installed
        logger.info("map version %d resident: %d layers loaded, %d shared with held versions",
                    expert_map.version, len(missing), len(reuse))
        return installed

    def drop(self, version: int) -> None:
        """Forget a prepared version (placement rolled it back)."""
        with self._lock:
            self._versions.pop(version, None)

    def retire_below(self, version: int) -> None:
        with self._lock:
            for v in [v for v in self._versions if v < version]:
                del self._versions[v]

    def resident_bytes(self) -> int:
        """Bytes of expert weights held, every storage counted once (versions share layers)."""
        with self._lock:
            held = list(self._versions.values())
        storages: dict[tuple[str, int], int] = {}
        for slots in held:
            for tensor in (*slots.w13, *slots.w2, *(slots.b13 or ()), *(slots.b2 or ())):
                storage = tensor.untyped_storage()
                storages[(str(tensor.device), storage.data_ptr())] = storage.nbytes()
        return sum(storages.values())

    def compute(self, header, hidden: torch.Tensor, local_slot_ids: torch.Tensor,
                weights: torch.Tensor) -> torch.Tensor:
        """hidden [n, D], local_slot_ids [n, K] in [-1, S), weights [n, K] → [n, D]."""
        with self._lock:
            slots = self._versions.get(header.map_version)
        if slots is None:
            from epserve.dataplane import StaleMapVersion

            raise StaleMapVersion(f"expert worker {self.worker_id} holds map versions {self.versions}, "
                                  f"not {header.map_version}")
        # the data plane delivers where its group lives (gloo: host memory), the experts compute on this device
        out = slots.compute(self.runner, header.layer, hidden.to(self.device, self.dtype),
                            local_slot_ids.to(self.device), weights.to(self.device))
        return out.to(hidden.device)
