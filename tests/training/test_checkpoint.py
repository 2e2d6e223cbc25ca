import json
import random
import re

import numpy as np
import pytest
import torch
from accelerate import Accelerator

from absvl.training.checkpoint import (
    CheckpointError,
    list_checkpoints,
    load_checkpoint,
    resolve_resume,
    rng_state,
    rotate_checkpoints,
    save_checkpoint,
    set_rng_state,
    verify_checkpoint,
)


def _parts(seed=0):
    torch.manual_seed(seed)
    model = torch.nn.Linear(4, 2)
    optimizer = torch.optim.AdamW(model.parameters(), lr=0.1)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0 / (1 + step))
    model(torch.randn(3, 4)).sum().backward()
    optimizer.step()
    scheduler.step()
    return model, optimizer, scheduler


def test_rng_state_round_trip_covers_torch_numpy_python():
    state = rng_state()
    expected = (torch.rand(3), np.random.rand(3), random.random())
    set_rng_state(state)
    again = (torch.rand(3), np.random.rand(3), random.random())
    assert torch.equal(expected[0], again[0]) and np.array_equal(expected[1], again[1]) and expected[2] == again[2]


def test_save_and_load_restore_everything(tmp_path):
    accelerator = Accelerator(cpu=True)
    model, optimizer, scheduler = _parts()
    path = save_checkpoint(accelerator, tmp_path, 7, model, optimizer, scheduler, {"step": 7, "epoch": 1})
    assert path.name == "checkpoint-00000007"
    assert sorted(p.name for p in path.iterdir()) == [
        "model.safetensors",
        "optimizer.pt",
        "rng-0.pt",
        "scheduler.pt",
        "trainer_state.json",
    ]
    after_save = torch.rand(2)
    other_model, other_opt, other_sched = _parts(seed=1)
    state = load_checkpoint(accelerator, path, other_model, other_opt, other_sched)
    assert state == {"step": 7, "epoch": 1}
    assert torch.equal(other_model.weight, model.weight)
    assert other_opt.state_dict()["state"][0]["exp_avg"].equal(optimizer.state_dict()["state"][0]["exp_avg"])
    assert other_sched.state_dict() == scheduler.state_dict()
    assert torch.equal(torch.rand(2), after_save)  # the RNG continues where the checkpoint left it


def test_incomplete_checkpoints_are_invisible_and_rotation_keeps_best(tmp_path):
    accelerator = Accelerator(cpu=True)
    model, optimizer, scheduler = _parts()
    for step in (1, 2, 3, 4):
        save_checkpoint(accelerator, tmp_path, step, model, optimizer, scheduler, {"step": step})
    (tmp_path / ".tmp-checkpoint-00000005").mkdir()  # a save killed half-way
    (tmp_path / "checkpoint-00000006").mkdir()  # no trainer_state.json: not complete
    assert [p.name for p in list_checkpoints(tmp_path)] == [f"checkpoint-0000000{i}" for i in (1, 2, 3, 4)]
    assert resolve_resume("latest", tmp_path).name == "checkpoint-00000004"
    rotate_checkpoints(tmp_path, keep_last=2, best=str(tmp_path / "checkpoint-00000001"))
    assert [p.name for p in list_checkpoints(tmp_path)] == [
        "checkpoint-00000001",
        "checkpoint-00000003",
        "checkpoint-00000004",
    ]
    assert not (tmp_path / ".tmp-checkpoint-00000005").exists()


def test_a_checkpoint_saved_again_is_replaced_whole_and_an_interrupted_swap_is_undone(tmp_path):
    accelerator = Accelerator(cpu=True)
    model, optimizer, scheduler = _parts()
    save_checkpoint(accelerator, tmp_path, 3, model, optimizer, scheduler, {"step": 3, "path": "é.jpg"})
    path = save_checkpoint(accelerator, tmp_path, 3, model, optimizer, scheduler, {"step": 3, "again": True})
    assert json.loads((path / "trainer_state.json").read_text(encoding="utf-8")) == {"step": 3, "again": True}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint-00000003"]
    path.rename(tmp_path / ".old-checkpoint-00000003")  # a crash between the swap's two renames
    assert list_checkpoints(tmp_path) == []
    rotate_checkpoints(tmp_path, keep_last=2, best=None)
    assert [p.name for p in list_checkpoints(tmp_path)] == ["checkpoint-00000003"]


def test_resume_errors_are_clear(tmp_path):
    assert resolve_resume(None, tmp_path) is None
    assert resolve_resume("latest", tmp_path) is None  # fresh run
    with pytest.raises(FileNotFoundError, match="is not a checkpoint folder"):
        resolve_resume(str(tmp_path), tmp_path)
    broken = tmp_path / "checkpoint-00000001"
    broken.mkdir()
    (broken / "trainer_state.json").write_text(json.dumps({"step": 1}))
    model, optimizer, scheduler = _parts()
    with pytest.raises(FileNotFoundError, match="has no model.safetensors"):
        load_checkpoint(Accelerator(cpu=True), broken, model, optimizer, scheduler)


def test_cuda_rng_states_are_saved_and_restored(monkeypatch):
    # no GPU here: a stand-in torch.cuda with two devices records what is restored
    devices = [torch.tensor([1, 2], dtype=torch.uint8), torch.tensor([3, 4], dtype=torch.uint8)]
    restored = {}
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.setattr(torch.cuda, "get_rng_state_all", lambda: [d.clone() for d in devices])
    monkeypatch.setattr(torch.cuda, "set_rng_state", lambda state, device: restored.__setitem__(device, state))
    state = rng_state()
    assert [s.tolist() for s in state["cuda"]] == [[1, 2], [3, 4]]
    set_rng_state(state)
    assert {k: v.tolist() for k, v in restored.items()} == {0: [1, 2], 1: [3, 4]}
    # resumed where fewer devices are: the ones there are restored, and a warning says the rest differ
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    restored.clear()
    with pytest.warns(UserWarning, match="RNG states of 2 CUDA devices and this machine has 1"):
        set_rng_state(state)
    assert list(restored) == [0]


def _run_of(tmp_path, steps=(1, 2, 3)):
    accelerator = Accelerator(cpu=True)
    model, optimizer, scheduler = _parts()
    for step in steps:
        save_checkpoint(accelerator, tmp_path, step, model, optimizer, scheduler, {"step": step})
    return [tmp_path / f"checkpoint-{step:08d}" for step in steps]


def _truncate(path, size):
    with open(path, "r+b") as f:
        f.truncate(size)


def test_resume_skips_damaged_checkpoints_saying_which_and_why(tmp_path):
    first, second, third = _run_of(tmp_path)
    assert [verify_checkpoint(p) for p in (first, second, third)] == [[], [], []]
    _truncate(third / "model.safetensors", 100)  # truncate -s: a full disk, a killed copy
    _truncate(second / "optimizer.pt", (second / "optimizer.pt").stat().st_size // 2)
    (problem,) = verify_checkpoint(third)
    assert re.fullmatch(r"model.safetensors is truncated \(100 bytes, shorter than its own header of \d+\)", problem)
    assert verify_checkpoint(second)[0].startswith("optimizer.pt is truncated or damaged")

    said = []
    assert resolve_resume("latest", tmp_path, notify=said.append, set_aside=True) == first
    assert len(said) == 2
    assert said[0].startswith(f"skipped {third}: model.safetensors is truncated") and "kept as" in said[0]
    assert said[1].startswith(f"skipped {second}: optimizer.pt is truncated") and "checkpoint-00000001" in said[1]
    # set aside: rotation and later resumes pass them by, and they are kept for a look
    assert list_checkpoints(tmp_path) == [first]
    assert (tmp_path / "checkpoint-00000003.broken" / "model.safetensors").is_file()
    assert resolve_resume("latest", tmp_path) == first
    # the one resumed from loads whole
    model, optimizer, scheduler = _parts(seed=1)
    assert load_checkpoint(Accelerator(cpu=True), first, model, optimizer, scheduler) == {"step": 1}


def test_a_checkpoint_cut_anywhere_is_caught_by_verify(tmp_path):
    (checkpoint,) = _run_of(tmp_path, steps=(5,))
    for name in ("model.safetensors", "optimizer.pt", "scheduler.pt", "rng-0.pt"):
        whole = (checkpoint / name).read_bytes()
        for size in (0, 7, 9, len(whole) // 3, len(whole) - 1):
            (checkpoint / name).write_bytes(whole[:size])
            assert verify_checkpoint(checkpoint)[0].startswith(f"{name} is truncated"), (name, size)
        (checkpoint / name).write_bytes(whole + b"x" * (name == "model.safetensors"))
        if name == "model.safetensors":
            assert verify_checkpoint(checkpoint) == [
                f"{name} is damaged (1 bytes more than its tensors: {len(whole) + 1:,} of {len(whole):,})"
            ]
            (checkpoint / name).write_bytes(whole)
        assert verify_checkpoint(checkpoint) == []
    (checkpoint / "trainer_state.json").write_text("{")
    assert verify_checkpoint(checkpoint)[0].startswith("trainer_state.json is not valid JSON")


def test_a_damaged_named_checkpoint_or_run_without_a_whole_one_is_refused_naming_the_file(tmp_path):
    (checkpoint,) = _run_of(tmp_path, steps=(6,))
    _truncate(checkpoint / "model.safetensors", 50)
    with pytest.raises(CheckpointError, match=r"cannot resume from .*checkpoint-00000006: model.safetensors is trunc"):
        resolve_resume(str(checkpoint), tmp_path)
    with pytest.raises(CheckpointError, match=r"no checkpoint of .* verifies \(checkpoint-00000006: model.safetensors"):
        resolve_resume("latest", tmp_path, set_aside=True)
    assert list_checkpoints(tmp_path) == [checkpoint]  # nothing set aside when nothing is resumed
    # a file that passes the cheap check but does not load: the error names it (no bare OSError/RuntimeError)
    (other,) = _run_of(tmp_path / "other", steps=(2,))
    torch.save({"not": "an optimizer state"}, other / "optimizer.pt")
    model, optimizer, scheduler = _parts()
    with pytest.raises(CheckpointError, match=r"cannot restore .*checkpoint-00000002/optimizer.pt"):
        load_checkpoint(Accelerator(cpu=True), other, model, optimizer, scheduler)
