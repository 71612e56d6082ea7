import pytest
import torch

from epserve.expert_map import ExpertMap
from epserve.expert_map_codec import expert_map_from_proto, expert_map_to_proto


def test_trivial_map_derives_log2phy_and_counts() -> None:
    m = ExpertMap.trivial(num_layers=2, num_logical=4, num_redundant=2, slot_owners=("a", "b"))
    assert m.phy2log.tolist() == [[0, 1, 2, 3, 0, 1]] * 2
    assert m.logcnt.tolist() == [[2, 2, 1, 1]] * 2
    assert m.replicas(0, 0) == [0, 4] and m.replicas(1, 3) == [3]
    assert m.log2phy[0, 2].tolist() == [2, -1]
    assert m.worker_of_slot(4) == "b" and list(m.slots_of_worker("a")) == [0, 1, 2]


def test_uncovered_expert_is_rejected() -> None:
    with pytest.raises(ValueError, match="logical expert 3 of MoE layer 1 has no replica"):
        ExpertMap(torch.tensor([[0, 1, 2, 3], [0, 1, 2, 2]]), 4)


def test_bad_shapes_and_values_are_rejected() -> None:
    with pytest.raises(ValueError, match="must be \\[layers, slots\\]"):
        ExpertMap(torch.tensor([0, 1]), 2)
    with pytest.raises(ValueError, match="values must be in"):
        ExpertMap(torch.tensor([[0, 5]]), 2)
    with pytest.raises(ValueError, match="do not split evenly"):
        ExpertMap(torch.tensor([[0, 1, 0]]), 2, slot_owners=("a", "b"))


def test_proto_round_trip_and_corruption_detected() -> None:
    m = ExpertMap(torch.tensor([[1, 0, -1, 1], [0, 0, 1, 1]]), 2, version=7, slot_owners=("w0", "w1"))
    back = expert_map_from_proto(expert_map_to_proto(m))
    assert torch.equal(back.phy2log, m.phy2log) and back.version == 7 and back.slot_owners == ("w0", "w1")
    assert back.checksum == m.checksum
    message = expert_map_to_proto(m)
    message.logcnt[0] = 5
    with pytest.raises(ValueError, match="logcnt"):
        expert_map_from_proto(message)
    message = expert_map_to_proto(m)
    del message.phy2log[-1]
    with pytest.raises(ValueError, match="phy2log has 7 entries"):
        expert_map_from_proto(message)
