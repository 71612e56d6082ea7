import torch

from attention_worker.expert_recorder import ExpertLoadRecorder, RecorderMode


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
    rec = ExpertLoadRecorder(RecorderMode.PER_TOKEN, num_layers=1, num_slots=3)
    rec.record(0, torch.tensor([[2, 1]]))
    dumped = torch.load(rec.dump(tmp_path / "d.pt"))
    assert dumped["mode"] == "per_token" and dumped["per_token"][0][1].tolist() == [[2, 1]]


def test_per_pass_dump_has_one_entry_per_pass(tmp_path):
    rec = ExpertLoadRecorder(RecorderMode.PER_PASS, num_layers=1, num_slots=2)
    for _ in range(3):
        rec.record(0, torch.tensor([[1, 0]]))
        rec.end_pass(0, 2)
    dumped = torch.load(rec.dump(tmp_path / "d.pt"))
    assert [p.tolist() for p in dumped["per_pass"]] == [[[1, 1]]] * 3
