import pytest
import torch

from epserve.attention_worker.expert_recorder import ExpertLoadRecorder, RecorderMode


def test_stat_window_counts_slots_and_resets_on_new_version(tmp_path):
    rec = ExpertLoadRecorder(RecorderMode.STAT, num_layers=2, num_slots=4)
    rec.end_pass(1, 4)                                   # first pass under version 1 starts the window
    rec.record(0, torch.tensor([[0, 1], [1, 3]]))
    rec.record(1, torch.tensor([[2, 2]]))
    rec.end_pass(1, 4)
    window, passes, version = rec.take_window()
    assert window.tolist() == [[1, 2, 0, 1], [0, 0, 2, 0]] and passes == 1 and version == 1
    assert rec.take_window()[0].sum() == 0
    rec.record(0, torch.tensor([[0, 0]]))
    rec.end_pass(2, 6)                                   # version 2: new window, new shape
    window, passes, version = rec.take_window()
    assert window.shape == (2, 6) and window.sum() == 0 and version == 2


def test_per_token_dump_keeps_choices(tmp_path):
    rec = ExpertLoadRecorder(RecorderMode.PER_TOKEN, num_layers=1, num_slots=3, map_version=4)
    rec.record(0, torch.tensor([[2, 1]]))
    rec.end_pass(4, 3)
    written = rec.dump(tmp_path / "d.pt", {"worker_id": "attention-0"})
    dumped = torch.load(tmp_path / "d.pt")
    assert dumped["mode"] == "per_token" and dumped["per_token"][0][1].tolist() == [[2, 1]]
    assert dumped["per_token_map_version"] == [4] and dumped["worker_id"] == "attention-0"
    assert written["num_passes"] == dumped["num_passes"] == 1 and dumped["num_token_records"] == 1
    assert torch.load(rec.dump(tmp_path / "e.pt") and tmp_path / "e.pt")["per_token"] == []   # dumped once


def test_per_pass_dump_has_one_entry_per_pass(tmp_path):
    rec = ExpertLoadRecorder(RecorderMode.PER_PASS, num_layers=1, num_slots=2)
    for _ in range(3):
        rec.record(0, torch.tensor([[1, 0]]))
        rec.end_pass(0, 2)
    rec.dump(tmp_path / "d.pt")
    dumped = torch.load(tmp_path / "d.pt")
    assert [p.tolist() for p in dumped["per_pass"]] == [[[1, 1]]] * 3
    assert dumped["per_pass_map_version"] == [0, 0, 0] and dumped["num_passes"] == 3


def test_a_failed_dump_loses_nothing(tmp_path):
    rec = ExpertLoadRecorder(RecorderMode.PER_PASS, num_layers=1, num_slots=2)
    rec.record(0, torch.tensor([[1, 1]]))
    rec.end_pass(0, 2)
    with pytest.raises(OSError):
        rec.dump(tmp_path / "missing" / "d.pt")
    assert rec.dump(tmp_path / "d.pt")["num_passes"] == 1 and len(torch.load(tmp_path / "d.pt")["per_pass"]) == 1


def test_track_passes_returns_each_pass_per_layer():
    rec = ExpertLoadRecorder(RecorderMode.STAT, num_layers=2, num_slots=4, track_passes=True)
    rec.record(0, torch.tensor([[0, 1]]))
    rec.record(1, torch.tensor([[3, 3]]))
    rec.record(0, torch.tensor([[1, 2]]))                # second micro-batch of the same pass
    assert rec.end_pass(0, 4).tolist() == [[1, 2, 1, 0], [0, 0, 0, 2]]
    assert rec.end_pass(0, 4) is None                    # nothing routed in this pass
    untracked = ExpertLoadRecorder(RecorderMode.STAT, num_layers=1, num_slots=2)
    untracked.record(0, torch.tensor([[0, 1]]))
    assert untracked.end_pass(0, 2) is None
