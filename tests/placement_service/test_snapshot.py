"""Expert-location snapshots (placement_service.snapshot): the --init-expert-location format."""

from __future__ import annotations

import json

import pytest
import torch

from epserve.expert_map import ExpertMap
from epserve.placement_service.snapshot import (ExpertSnapshot, load_snapshot, placement_from_snapshot,
                                        save_snapshot)

L, E, P = 3, 8, 12  # MoE layers, logical experts, physical slots


def a_map() -> torch.Tensor:
    gen = torch.Generator().manual_seed(0)
    rows = [torch.cat([torch.randperm(E, generator=gen), torch.randint(0, E, (P - E,), generator=gen)])
            for _ in range(L)]
    return torch.stack(rows)


@pytest.mark.parametrize("suffix", [".json", ".pt"])
def test_round_trip_of_a_map(tmp_path, suffix):
    phy2log = a_map()
    path = tmp_path / f"snap{suffix}"
    save_snapshot(path, num_logical_experts=E, physical_to_logical_map=phy2log, model_name="tiny-moe")
    snap = load_snapshot(path)
    assert torch.equal(snap.physical_to_logical_map, phy2log)
    assert snap.logical_count is None
    assert (snap.num_layers, snap.num_logical_experts, snap.model_name) == (L, E, "tiny-moe")
    snap.validate(num_layers=L, num_logical_experts=E, num_physical_slots=P, model_name="tiny-moe")
    placed = placement_from_snapshot(snap, num_layers=L, num_logical_experts=E, num_physical_slots=P,
                                     num_workers=4)
    assert torch.equal(placed, phy2log)


@pytest.mark.parametrize("suffix", [".json", ".pt"])
def test_round_trip_of_counts_then_planned(tmp_path, suffix):
    counts = torch.tensor([[100, 1, 2, 3, 4, 5, 6, 7]] * L, dtype=torch.float64)
    counts[1, 3] = 2.5  # a fractional count survives JSON
    path = tmp_path / f"counts{suffix}"
    save_snapshot(path, num_logical_experts=E, logical_count=counts)
    snap = load_snapshot(path)
    assert torch.equal(snap.logical_count, counts)
    placed = placement_from_snapshot(snap, num_layers=L, num_logical_experts=E, num_physical_slots=P,
                                     num_workers=4, algorithm="deepseek")
    expert_map = ExpertMap(placed, E)
    assert expert_map.num_physical_slots == P
    assert int(expert_map.logcnt[0, 0]) == P - E + 1  # the hot expert got every redundant slot


def test_sglang_style_file_without_identity_is_accepted(tmp_path):
    path = tmp_path / "sglang.json"
    path.write_text(json.dumps({"physical_to_logical_map": a_map().tolist()}))
    snap = load_snapshot(path)
    assert snap.num_layers is None and snap.model_name is None
    snap.validate(num_layers=L, num_logical_experts=E, num_physical_slots=P, model_name="any")


def write(tmp_path, data, name="bad.json"):
    path = tmp_path / name
    path.write_text(json.dumps(data))
    return path


def check(path, message, **model):
    model = {"num_layers": L, "num_logical_experts": E, "num_physical_slots": P, **model}
    with pytest.raises(ValueError, match=message):
        load_snapshot(path).validate(**model)


def test_layer_count_mismatch_names_field_and_counts(tmp_path):
    path = write(tmp_path, {"physical_to_logical_map": a_map().tolist()})
    check(path, "physical_to_logical_map has 3 layers, the model has 58 MoE layers", num_layers=58)


def test_slot_count_mismatch(tmp_path):
    path = write(tmp_path, {"physical_to_logical_map": a_map()[:, :10].tolist()})
    check(path, r"physical_to_logical_map has 10 slots per layer, the deployment has 12 physical slots "
                r"\(8 experts \+ 4 redundant\)")


def test_expert_ids_out_of_range_and_uncovered(tmp_path):
    phy2log = a_map()
    phy2log[1, 5] = 8
    check(write(tmp_path, {"physical_to_logical_map": phy2log.tolist()}),
          r"values must be in \[-1, 8\); found 8 at layer 1 slot 5")
    phy2log = torch.zeros(L, P, dtype=torch.int64)
    check(write(tmp_path, {"physical_to_logical_map": phy2log.tolist()}),
          "leaves logical expert 1 of layer 0 without a replica")


def test_logical_count_shape_mismatch(tmp_path):
    path = write(tmp_path, {"logical_count": torch.ones(L, 16).tolist()})
    check(path, "logical_count has 16 experts per layer, the model has 8 logical experts")
    path = write(tmp_path, {"logical_count": torch.ones(2, E).tolist()})
    check(path, "logical_count has 2 layers, the model has 3 MoE layers")
    path = write(tmp_path, {"logical_count": [[1, -2] + [0] * 6] * L})
    with pytest.raises(ValueError, match="logical_count in .* must hold finite counts >= 0"):
        load_snapshot(path)


def test_snapshot_of_another_model_is_refused(tmp_path):
    path = tmp_path / "other.pt"
    save_snapshot(path, num_logical_experts=E, physical_to_logical_map=a_map(), model_name="model-a")
    check(path, "was saved for model 'model-a', this model is 'model-b'", model_name="model-b")
    check(path, "saved for a model with 8 logical experts, the model has 16", num_logical_experts=16)
    path = write(tmp_path, {"logical_count": torch.ones(L, E).tolist(), "num_layers": 5})
    check(path, "saved for a model with 5 MoE layers, the model has 3 MoE layers")


def test_malformed_files(tmp_path):
    with pytest.raises(ValueError, match="holds neither physical_to_logical_map"):
        load_snapshot(write(tmp_path, {"something": 1}))
    with pytest.raises(ValueError, match="is not valid JSON"):
        bad = tmp_path / "broken.json"
        bad.write_text("{not json")
        load_snapshot(bad)
    with pytest.raises(ValueError, match="must be a .*numeric array"):
        load_snapshot(write(tmp_path, {"physical_to_logical_map": [[0, 1], [2]]}))
    with pytest.raises(ValueError, match=r"got shape \(12,\)"):
        load_snapshot(write(tmp_path, {"physical_to_logical_map": list(range(12))}))
    with pytest.raises(ValueError, match="bare array"):
        load_snapshot(write(tmp_path, [[0, 1, 2]]))
    with pytest.raises(ValueError, match="does not exist"):
        load_snapshot(tmp_path / "missing.pt")
    with pytest.raises(ValueError, match="not a readable torch file"):
        junk = tmp_path / "junk.pt"
        junk.write_bytes(b"\x00\x01garbage")
        load_snapshot(junk)
    with pytest.raises(ValueError, match="num_layers in snapshot .* must be a positive integer"):
        load_snapshot(write(tmp_path, {"logical_count": [[1] * E], "num_layers": "3"}))


def test_in_memory_snapshot_needs_a_field():
    with pytest.raises(ValueError, match="holds neither"):
        ExpertSnapshot()
