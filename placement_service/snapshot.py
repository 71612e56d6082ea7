"""Expert-location snapshots: the ``--init-expert-location`` file format (as SGLang's).

Legend: L MoE layers, E logical experts, P physical slots.

A snapshot is a JSON file or a ``torch.save`` ``.pt`` file holding a dict with either

- ``physical_to_logical_map`` [L, P]: the placement itself (-1 = empty slot), or
- ``logical_count`` [L, E]: load per logical expert; a placement is then planned from it
  with the chosen EPLB algorithm (``placement_from_snapshot``).

Files written here also carry the model identity, so a snapshot of another model is
refused instead of silently misplacing experts: ``num_layers``, ``num_logical_experts``,
optional ``model_name``, plus ``num_physical_slots`` and ``format_version``. Files without
these fields (e.g. from SGLang) are accepted; their tensors' shapes are still checked.

Every check raises ValueError naming the field, what it holds and what the model expects.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch

FORMAT_VERSION = 1
PHY2LOG_KEY = "physical_to_logical_map"
COUNT_KEY = "logical_count"


@dataclass(frozen=True)
class ExpertSnapshot:
    """What a snapshot file holds. Tensors are int64 (phy2log) / float64 (counts)."""

    physical_to_logical_map: torch.Tensor | None = None  # [L, P]
    logical_count: torch.Tensor | None = None  # [L, E]
    num_layers: int | None = None
    num_logical_experts: int | None = None
    model_name: str | None = None
    source: str = "<memory>"

    def __post_init__(self) -> None:
        if self.physical_to_logical_map is None and self.logical_count is None:
            raise ValueError(f"snapshot {self.source} holds neither {PHY2LOG_KEY} [layers, physical slots] "
                             f"nor {COUNT_KEY} [layers, logical experts]")
        if self.physical_to_logical_map is not None:
            object.__setattr__(self, "physical_to_logical_map",
                               _as_matrix(self.physical_to_logical_map, PHY2LOG_KEY, torch.int64, self.source))
        if self.logical_count is not None:
            counts = _as_matrix(self.logical_count, COUNT_KEY, torch.float64, self.source)
            if not torch.isfinite(counts).all() or (counts < 0).any():
                raise ValueError(f"{COUNT_KEY} in {self.source} must hold finite counts >= 0")
            object.__setattr__(self, "logical_count", counts)

    def validate(self, *, num_layers: int, num_logical_experts: int,
                 num_physical_slots: int | None = None, model_name: str | None = None) -> None:
        """Raise ValueError unless this snapshot fits the model (and the deployment's P)."""
        where = f"snapshot {self.source}"
        if model_name and self.model_name and model_name != self.model_name:
            raise ValueError(f"{where} was saved for model {self.model_name!r}, this model is {model_name!r}")
        if self.num_logical_experts is not None and self.num_logical_experts != num_logical_experts:
            raise ValueError(f"{where} was saved for a model with {self.num_logical_experts} logical experts, "
                             f"the model has {num_logical_experts}")
        if self.num_layers is not None and self.num_layers != num_layers:
            raise ValueError(f"{where} was saved for a model with {self.num_layers} MoE layers, "
                             f"the model has {num_layers} MoE layers")
        if self.physical_to_logical_map is not None:
            phy2log = self.physical_to_logical_map
            if phy2log.shape[0] != num_layers:
                raise ValueError(f"{PHY2LOG_KEY} has {phy2log.shape[0]} layers, the model has "
                                 f"{num_layers} MoE layers")
            if num_physical_slots is not None and phy2log.shape[1] != num_physical_slots:
                raise ValueError(
                    f"{PHY2LOG_KEY} has {phy2log.shape[1]} slots per layer, the deployment has "
                    f"{num_physical_slots} physical slots ({num_logical_experts} experts + "
                    f"{num_physical_slots - num_logical_experts} redundant): change "
                    "--ep-num-redundant-experts or use a snapshot made for this deployment")
            bad = (phy2log < -1) | (phy2log >= num_logical_experts)
            if bad.any():
                layer, slot = (int(v) for v in bad.nonzero()[0])
                raise ValueError(f"{PHY2LOG_KEY} values must be in [-1, {num_logical_experts}); found "
                                 f"{int(phy2log[layer, slot])} at layer {layer} slot {slot}")
            covered = torch.zeros(num_layers, num_logical_experts, dtype=torch.bool)
            valid = phy2log >= 0
            rows = torch.arange(num_layers).unsqueeze(1).expand_as(phy2log)
            covered[rows[valid], phy2log[valid]] = True
            if not covered.all():
                layer, expert = (int(v) for v in (~covered).nonzero()[0])
                raise ValueError(f"{PHY2LOG_KEY} leaves logical expert {expert} of layer {layer} "
                                 f"without a replica ({int((~covered).sum())} (layer, expert) pairs uncovered)")
        if self.logical_count is not None:
            counts = self.logical_count
            if counts.shape[0] != num_layers:
                raise ValueError(f"{COUNT_KEY} has {counts.shape[0]} layers, the model has "
                                 f"{num_layers} MoE layers")
            if counts.shape[1] != num_logical_experts:
                raise ValueError(f"{COUNT_KEY} has {counts.shape[1]} experts per layer, the model has "
                                 f"{num_logical_experts} logical experts")


def load_snapshot(path: str | Path) -> ExpertSnapshot:
    """Read a ``.json`` or ``.pt`` snapshot (format chosen by the suffix; other suffixes are
    tried as JSON, then as torch)."""
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"snapshot file {path} does not exist")
    if path.suffix == ".pt":
        data = _load_torch(path)
    elif path.suffix == ".json":
        data = _load_json(path)
    else:
        try:
            data = _load_json(path)
        except ValueError:
            data = _load_torch(path)
    if isinstance(data, (list, torch.Tensor)):
        raise ValueError(f"snapshot {path} holds a bare array; wrap it as "
                         f'{{"{PHY2LOG_KEY}": [...]}} or {{"{COUNT_KEY}": [...]}}')
    if not isinstance(data, dict):
        raise ValueError(f"snapshot {path} must hold a dict with {PHY2LOG_KEY} or {COUNT_KEY}, "
                         f"got {type(data).__name__}")
    return ExpertSnapshot(
        physical_to_logical_map=data.get(PHY2LOG_KEY),
        logical_count=data.get(COUNT_KEY),
        num_layers=_optional_int(data, "num_layers", path),
        num_logical_experts=_optional_int(data, "num_logical_experts", path),
        model_name=data.get("model_name") or None,
        source=str(path),
    )


def save_snapshot(path: str | Path, *, num_logical_experts: int,
                  physical_to_logical_map: torch.Tensor | None = None,
                  logical_count: torch.Tensor | None = None,
                  model_name: str | None = None) -> None:
    """Write a snapshot (``.pt`` → torch.save, anything else → JSON) with model identity."""
    snapshot = ExpertSnapshot(physical_to_logical_map=physical_to_logical_map,
                              logical_count=logical_count, num_logical_experts=num_logical_experts,
                              model_name=model_name, source=str(path))
    tensors = [t for t in (snapshot.physical_to_logical_map, snapshot.logical_count) if t is not None]
    num_layers = tensors[0].shape[0]
    snapshot.validate(num_layers=num_layers, num_logical_experts=num_logical_experts)
    data: dict = {"format_version": FORMAT_VERSION, "num_layers": num_layers,
                  "num_logical_experts": num_logical_experts}
    if model_name:
        data["model_name"] = model_name
    if snapshot.physical_to_logical_map is not None:
        data["num_physical_slots"] = snapshot.physical_to_logical_map.shape[1]
    path = Path(path)
    if path.suffix == ".pt":
        if snapshot.physical_to_logical_map is not None:
            data[PHY2LOG_KEY] = snapshot.physical_to_logical_map
        if snapshot.logical_count is not None:
            data[COUNT_KEY] = snapshot.logical_count
        torch.save(data, path)
        return
    if snapshot.physical_to_logical_map is not None:
        data[PHY2LOG_KEY] = snapshot.physical_to_logical_map.tolist()
    if snapshot.logical_count is not None:
        counts = snapshot.logical_count
        integral = bool((counts == counts.round()).all())
        data[COUNT_KEY] = counts.to(torch.int64).tolist() if integral else counts.tolist()
    path.write_text(json.dumps(data, separators=(",", ":")) + "\n")


def placement_from_snapshot(snapshot: ExpertSnapshot, *, num_layers: int, num_logical_experts: int,
                            num_physical_slots: int, num_workers: int, num_nodes: int = 1,
                            num_groups: int | None = None, algorithm: str = "auto",
                            model_name: str | None = None) -> torch.Tensor:
    """The phy2log [L, P] a snapshot asks for: its map as is, or a plan from its counts."""
    snapshot.validate(num_layers=num_layers, num_logical_experts=num_logical_experts,
                      num_physical_slots=num_physical_slots, model_name=model_name)
    if snapshot.physical_to_logical_map is not None:
        return snapshot.physical_to_logical_map.clone()
    from epserve.placement_service.eplb import plan

    return plan(snapshot.logical_count, num_physical_slots, num_groups, num_nodes, num_workers,
                algorithm=algorithm)


# -- helpers -------------------------------------------------------------------------------
def _as_matrix(value, name: str, dtype: torch.dtype, source: str) -> torch.Tensor:
    try:
        tensor = torch.as_tensor(value)
    except (TypeError, ValueError, RuntimeError) as exc:
        raise ValueError(f"{name} in {source} must be a [layers, {'slots' if name == PHY2LOG_KEY else 'experts'}] "
                         f"numeric array: {exc}") from None
    if tensor.dim() != 2 or tensor.shape[0] == 0 or tensor.shape[1] == 0:
        raise ValueError(f"{name} in {source} must be a non-empty [layers, "
                         f"{'physical slots' if name == PHY2LOG_KEY else 'logical experts'}] array, "
                         f"got shape {tuple(tensor.shape)}")
    if tensor.dtype == torch.bool or tensor.is_complex():
        raise ValueError(f"{name} in {source} must be numeric, got {tensor.dtype}")
    if dtype == torch.int64 and tensor.is_floating_point():
        if not bool((tensor == tensor.round()).all()):
            raise ValueError(f"{name} in {source} must hold integer expert ids")
    return tensor.to(dtype)


def _optional_int(data: dict, key: str, path: Path) -> int | None:
    value = data.get(key)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise ValueError(f"{key} in snapshot {path} must be a positive integer, got {value!r}")
    return value


def _load_json(path: Path):
    try:
        return json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ValueError(f"snapshot {path} is not valid JSON: {exc}") from None


def _load_torch(path: Path):
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch raises several types for a bad file
        raise ValueError(f"snapshot {path} is not a readable torch file: {exc}") from None
