"""Tests of the best-LTA checkpoint registry (checkpoint_saver.py)."""

import json
import math
import os
import random
import subprocess
import sys
from pathlib import Path

import pytest
import torch

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT))

import checkpoint_saver  # noqa: E402
from checkpoint_saver import (  # noqa: E402
    CheckpointSaver,
    instance_key,
    leaderboard,
    main,
    read_index,
    save_atomic,
)


def tiny_checkpoint(value: float) -> dict:
    return {"policy": {"weight": torch.full((2, 2), float(value))}, "note": "tiny"}


def checkpoint_files(folder: Path) -> set[str]:
    return {path.name for path in folder.glob("*.pt")}


def assert_folder_consistent(folder: Path, expected_scores: list[float], lower_is_better=False):
    """The index is the expected ranking and matches exactly the .pt files in the folder."""
    index = json.loads((folder / "index.json").read_text())
    assert [entry["score"] for entry in index] == expected_scores
    assert checkpoint_files(folder) == {entry["file"] for entry in index}
    for entry in index:
        stored = torch.load(folder / entry["file"], weights_only=True)
        assert stored["score"] == entry["score"]
        assert stored["run_name"] == entry["run_name"]
        assert stored["global_step"] == entry["global_step"]
        assert stored["created"] == entry["created"]
        assert stored["lower_is_better"] is lower_is_better
        assert stored["instance"] == folder.name
        assert torch.equal(stored["policy"]["weight"], torch.full((2, 2), stored["score"]))


def test_top_k_over_sequential_runs(tmp_path):
    rng = random.Random(0)
    submitted = []
    for run in range(4):
        # A fresh saver per run, as every training process creates its own.
        saver = CheckpointSaver(tmp_path, "inst", top_k=5)
        for step in range(6):
            score = round(rng.uniform(-50, 50), 3)
            expected_entry = len(submitted) < 5 or score > sorted(submitted, reverse=True)[4]
            entered = saver.submit(score, tiny_checkpoint(score), f"run{run}", step * 1000)
            assert entered is expected_entry
            submitted.append(score)

    best_five = sorted(submitted, reverse=True)[:5]
    assert [entry["score"] for entry in saver.entries()] == best_five
    assert_folder_consistent(tmp_path / "inst", best_five)


def test_fewer_than_k_submissions_are_all_kept(tmp_path):
    saver = CheckpointSaver(tmp_path, "inst", top_k=5)
    assert saver.submit(1.0, tiny_checkpoint(1.0), "run", 1)
    assert saver.submit(3.0, tiny_checkpoint(3.0), "run", 2)
    assert_folder_consistent(tmp_path / "inst", [3.0, 1.0])


def test_eviction_deletes_the_file(tmp_path):
    saver = CheckpointSaver(tmp_path, "inst", top_k=2)
    saver.submit(1.0, tiny_checkpoint(1.0), "run", 1)
    saver.submit(2.0, tiny_checkpoint(2.0), "run", 2)
    worst_file = saver.entries()[-1]["file"]

    assert saver.submit(3.0, tiny_checkpoint(3.0), "run", 3)
    assert not (tmp_path / "inst" / worst_file).exists()
    assert_folder_consistent(tmp_path / "inst", [3.0, 2.0])


def test_equal_scores_keep_the_older_checkpoint(tmp_path):
    saver = CheckpointSaver(tmp_path, "inst", top_k=2)
    saver.submit(5.0, tiny_checkpoint(5.0), "first", 1)
    saver.submit(5.0, tiny_checkpoint(5.0), "second", 2)

    assert not saver.submit(5.0, tiny_checkpoint(5.0), "third", 3)
    assert [entry["run_name"] for entry in saver.entries()] == ["first", "second"]
    assert_folder_consistent(tmp_path / "inst", [5.0, 5.0])


@pytest.mark.parametrize("score", [math.nan, math.inf, -math.inf])
def test_non_finite_scores_are_never_saved(tmp_path, score):
    saver = CheckpointSaver(tmp_path, "inst", top_k=3)
    assert not saver.submit(score, tiny_checkpoint(0.0), "run", 1)
    assert saver.entries() == []
    assert checkpoint_files(tmp_path / "inst") == set()


def test_lower_is_better_keeps_the_lowest_costs(tmp_path):
    saver = CheckpointSaver(tmp_path, "costs", top_k=3, lower_is_better=True)
    for step, cost in enumerate([9.0, 4.0, 7.0, 1.0, 8.0, 2.0]):
        saver.submit(cost, tiny_checkpoint(cost), "run", step)
    assert not saver.submit(4.0, tiny_checkpoint(4.0), "run", 99)  # ties the 3rd: not better
    assert_folder_consistent(tmp_path / "costs", [1.0, 2.0, 4.0], lower_is_better=True)


def test_a_score_that_cannot_enter_is_not_serialised(tmp_path, monkeypatch):
    saver = CheckpointSaver(tmp_path, "inst", top_k=1)
    saver.submit(10.0, tiny_checkpoint(10.0), "run", 1)

    def fail_save(*args, **kwargs):
        raise AssertionError("torch.save called for a score outside the top-k")

    monkeypatch.setattr(checkpoint_saver.torch, "save", fail_save)
    assert not saver.submit(3.0, tiny_checkpoint(3.0), "run", 2)


def test_invalid_configuration_is_rejected(tmp_path):
    with pytest.raises(ValueError, match="top_k"):
        CheckpointSaver(tmp_path, "inst", top_k=0)
    for unsafe in ["../escape", "a/b", "", ".hidden", "with space"]:
        with pytest.raises(ValueError, match="instance_key"):
            CheckpointSaver(tmp_path, unsafe)

    CheckpointSaver(tmp_path, "inst").submit(1.0, tiny_checkpoint(1.0), "run", 1)
    with pytest.raises(ValueError, match="lower_is_better"):
        CheckpointSaver(tmp_path, "inst", lower_is_better=True).submit(
            0.5, tiny_checkpoint(0.5), "run", 2
        )


def test_run_names_are_sanitised_into_unique_file_names(tmp_path):
    saver = CheckpointSaver(tmp_path, "inst", top_k=5)
    saver.submit(1.0, tiny_checkpoint(1.0), "../evil run/name", 7)
    saver.submit(2.0, tiny_checkpoint(2.0), "../evil run/name", 7)
    files = [entry["file"] for entry in saver.entries()]
    assert len(set(files)) == 2
    for name in files:
        assert "/" not in name and " " not in name and ".." not in name
        assert "step7" in name and name.endswith(".pt")
    assert_folder_consistent(tmp_path / "inst", [2.0, 1.0])


def _fill(tmp_path, scores, top_k=5) -> Path:
    saver = CheckpointSaver(tmp_path, "inst", top_k=top_k)
    for step, score in enumerate(scores):
        saver.submit(score, tiny_checkpoint(score), f"run{step}", step)
    return tmp_path / "inst"


@pytest.mark.parametrize(
    "corrupt",
    [
        lambda index: "{not json",
        lambda index: json.dumps({"entries": index}),
        lambda index: json.dumps([{k: v for k, v in e.items() if k != "score"} for e in index]),
        lambda index: json.dumps(index + [{**index[0], "file": "gone.pt"}]),
    ],
    ids=["garbage", "not-a-list", "missing-keys", "missing-file"],
)
def test_corrupt_index_is_rebuilt_from_the_files(tmp_path, corrupt):
    folder = _fill(tmp_path, [3.0, 1.0, 2.0])
    index_path = folder / "index.json"
    index_path.write_text(corrupt(json.loads(index_path.read_text())))

    with pytest.warns(RuntimeWarning, match="rebuilding") as caught:
        entries = CheckpointSaver(tmp_path, "inst").entries()
    assert str(folder) in str(caught[0].message)
    assert [entry["score"] for entry in entries] == [3.0, 2.0, 1.0]
    assert_folder_consistent(folder, [3.0, 2.0, 1.0])


def test_missing_index_is_rebuilt_and_extras_beyond_top_k_deleted(tmp_path):
    folder = _fill(tmp_path, [1.0, 4.0, 2.0, 3.0], top_k=4)
    (folder / "index.json").unlink()

    saver = CheckpointSaver(tmp_path, "inst", top_k=2)
    with pytest.warns(RuntimeWarning, match="index.json is missing"):
        assert saver.submit(2.5, tiny_checkpoint(2.5), "late", 9) is False
    assert_folder_consistent(folder, [4.0, 3.0])


def test_rebuild_skips_unreadable_files_and_ignores_temp_files(tmp_path):
    folder = _fill(tmp_path, [1.0, 2.0])
    (folder / "index.json").write_text("[")
    (folder / "truncated.pt").write_bytes(b"\x80\x02garbage")
    torch.save({"weights": torch.zeros(1)}, folder / "foreign.pt")  # no registry metadata
    (folder / ".tmp-crashed.pt.0123abcd").write_bytes(b"partial")

    with pytest.warns(RuntimeWarning) as caught:
        entries = CheckpointSaver(tmp_path, "inst").entries()
    messages = " ".join(str(warning.message) for warning in caught)
    assert "truncated.pt" in messages and "foreign.pt" in messages
    assert [entry["score"] for entry in entries] == [2.0, 1.0]
    assert_folder_consistent(folder, [2.0, 1.0])
    # Unreadable checkpoints are set aside for inspection; crash leftovers are removed.
    assert (folder / "truncated.pt.unreadable").exists()
    assert (folder / "foreign.pt.unreadable").exists()
    assert not (folder / ".tmp-crashed.pt.0123abcd").exists()


def test_orphan_files_are_merged_or_removed(tmp_path):
    folder = _fill(tmp_path, [1.0, 2.0], top_k=2)
    index = json.loads((folder / "index.json").read_text())
    # Simulate writers that crashed after saving a checkpoint but before updating the index.
    for score in (5.0, 0.5):
        metadata = {**index[0], "score": score, "run_name": f"orphan{score}"}
        del metadata["file"]
        save_atomic({**tiny_checkpoint(score), **metadata, "instance": "inst"},
                    folder / f"orphan{score}.pt")

    with pytest.warns(RuntimeWarning, match="missing from index.json"):
        entries = CheckpointSaver(tmp_path, "inst", top_k=2).entries()
    assert [entry["run_name"] for entry in entries] == ["orphan5.0", "run1"]
    assert not (folder / "orphan0.5.pt").exists()
    assert_folder_consistent(folder, [5.0, 2.0])


def test_read_index_rebuilds_without_deleting(tmp_path):
    folder = _fill(tmp_path, [1.0, 3.0, 2.0])
    (folder / "index.json").unlink()
    with pytest.warns(RuntimeWarning, match=str(folder.name)):
        assert [entry["score"] for entry in read_index(folder)] == [3.0, 2.0, 1.0]
    assert_folder_consistent(folder, [3.0, 2.0, 1.0])

    costs = _fill_costs(tmp_path)
    (costs / "index.json").write_text("garbage")
    with pytest.warns(RuntimeWarning):
        assert [entry["score"] for entry in read_index(costs)] == [1.0, 2.0]


def _fill_costs(tmp_path) -> Path:
    saver = CheckpointSaver(tmp_path, "costs", lower_is_better=True)
    for step, cost in enumerate([2.0, 1.0]):
        saver.submit(cost, tiny_checkpoint(cost), "run", step)
    return tmp_path / "costs"


def test_save_atomic_round_trips_and_leaves_no_temp_files(tmp_path):
    path = tmp_path / "run" / "best.pt"
    save_atomic({"weight": torch.ones(3), "step": 1}, path)
    save_atomic({"weight": torch.zeros(3), "step": 2}, path)
    loaded = torch.load(path, weights_only=True)
    assert loaded["step"] == 2 and torch.equal(loaded["weight"], torch.zeros(3))
    assert [p.name for p in path.parent.iterdir()] == ["best.pt"]


def test_concurrent_processes_end_with_the_true_top_k(tmp_path):
    worker = r"""
import json, os, random, sys, time
sys.path.insert(0, sys.argv[1])
import torch
from checkpoint_saver import CheckpointSaver
root, seed, start_signal = sys.argv[2], int(sys.argv[3]), sys.argv[4]
saver = CheckpointSaver(root, "race", top_k=5)
print("ready", flush=True)
while not os.path.exists(start_signal):  # start together to maximise contention
    time.sleep(0.002)
rng = random.Random(seed)
scores = [rng.uniform(0, 100) for _ in range(10)]
for step, score in enumerate(scores):
    checkpoint = {"policy": {"weight": torch.full((2, 2), score)}}
    saver.submit(score, checkpoint, f"proc{seed}", step)
print(json.dumps(scores), flush=True)
"""
    start_signal = tmp_path / "go"
    processes = [
        subprocess.Popen(
            [sys.executable, "-c", worker, str(REPO_ROOT), str(tmp_path), str(seed),
             str(start_signal)],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for seed in range(4)
    ]
    try:
        for process in processes:
            assert process.stdout.readline().strip() == "ready"
        start_signal.touch()
        outputs = [process.communicate(timeout=60) for process in processes]
    finally:
        for process in processes:
            process.kill()

    submitted = []
    for process, (stdout, stderr) in zip(processes, outputs):
        assert process.returncode == 0, stderr
        assert "Warning" not in stderr  # no index was ever found corrupt
        submitted += json.loads(stdout)
    assert len(submitted) == 40
    best_five = sorted(submitted, reverse=True)[:5]
    folder = tmp_path / "race"
    index = json.loads((folder / "index.json").read_text())
    assert [entry["score"] for entry in index] == best_five
    assert checkpoint_files(folder) == {entry["file"] for entry in index}
    assert not [p.name for p in folder.iterdir() if p.name.startswith(".tmp-")]
    for entry in index:
        stored = torch.load(folder / entry["file"], weights_only=True)
        assert stored["score"] == entry["score"]
        assert stored["run_name"] == entry["run_name"]
        assert torch.equal(stored["policy"]["weight"], torch.full((2, 2), entry["score"]))


SAFE_KEY_CHARACTERS = set("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789._=,+-")


def assert_safe_folder_name(key: str):
    assert key and set(key) <= SAFE_KEY_CHARACTERS
    assert ".." not in key and not key.startswith(".")
    assert len(key) <= checkpoint_saver.MAX_INSTANCE_KEY_LENGTH


def test_instance_key_is_readable_and_safe():
    assert instance_key("Hopper-v4") == "Hopper-v4"
    key = instance_key("queueing:QueueNetwork-v0", {"instance": "criss-cross"})
    assert key.startswith("queueing_QueueNetwork-v0__instance=criss-cross")
    for unsafe in ["a/b", "a\\b", "x:y z", "../../etc", "tab\there", "\x00", "", "." * 5,
                   "é" * 300, "long-" * 100]:
        assert_safe_folder_name(instance_key(unsafe))
        assert_safe_folder_name(instance_key("Env-v0", {"path": unsafe}))


def test_instance_key_distinguishes_inputs_and_ignores_kwarg_order():
    assert instance_key("Env-v0", {"a": 1, "b": 2}) == instance_key("Env-v0", {"b": 2, "a": 1})
    distinct_inputs = [
        ("Env-v0", None),
        ("Env-v0", {"a": 1}),
        ("Env-v0", {"a": 2}),
        ("Env-v0", {"a": "1"}),  # sanitises like {"a": 1}
        ("Env-v1", {"a": 1}),
        ("a:b", None),
        ("a_b", None),  # sanitised "a:b" reads the same
        ("x" * 300 + "1", None),
        ("x" * 300 + "2", None),  # equal after truncation
    ]
    keys = [instance_key(env_id, kwargs) for env_id, kwargs in distinct_inputs]
    assert len(set(keys)) == len(keys)


def test_instance_key_problem_instance_overrides_env():
    assert instance_key("Env-v0", {"a": 1}, problem_instance="criss-cross") == "criss-cross"
    assert instance_key("Other-v0", problem_instance="criss-cross") == "criss-cross"
    assert_safe_folder_name(instance_key("Env-v0", problem_instance="my/instance"))


def test_leaderboard_lists_instances_scores_and_runs(tmp_path):
    saver = CheckpointSaver(tmp_path, "b-instance", top_k=3)
    saver.submit(12.5, tiny_checkpoint(12.5), "alpha-run", 1000)
    saver.submit(-3.25, tiny_checkpoint(-3.25), "beta-run", 2000)
    _fill_costs(tmp_path)

    text = leaderboard(tmp_path)
    assert text.index("b-instance") < text.index("costs")
    for expected in ["12.5", "-3.25", "alpha-run", "beta-run", "1000", "2000",
                     "higher score is better", "lower score is better"]:
        assert expected in text
    assert text.index("12.5") < text.index("-3.25")

    only_costs = leaderboard(tmp_path, "costs")
    assert "costs" in only_costs and "alpha-run" not in only_costs


def test_cli_prints_the_leaderboard_and_fails_cleanly_on_a_missing_root(tmp_path):
    CheckpointSaver(tmp_path / "ckpt", "inst").submit(7.75, tiny_checkpoint(7.75), "cli-run", 42)
    shown = subprocess.run(
        [sys.executable, str(REPO_ROOT / "checkpoint_saver.py"), str(tmp_path / "ckpt")],
        capture_output=True, text=True, timeout=60,
    )
    assert shown.returncode == 0, shown.stderr
    assert "7.75" in shown.stdout and "cli-run" in shown.stdout and "42" in shown.stdout

    missing = subprocess.run(
        [sys.executable, str(REPO_ROOT / "checkpoint_saver.py"), str(tmp_path / "nowhere")],
        capture_output=True, text=True, timeout=60,
    )
    assert missing.returncode == 2
    assert "Traceback" not in missing.stderr
    assert len(missing.stderr.strip().splitlines()) == 1
    assert "nowhere" in missing.stderr and "does not exist" in missing.stderr


def test_cli_unknown_instance_and_empty_root(tmp_path, capsys):
    CheckpointSaver(tmp_path, "known").submit(1.0, tiny_checkpoint(1.0), "run", 1)
    assert main([str(tmp_path), "--instance", "unknown"]) == 2
    error = capsys.readouterr().err
    assert len(error.strip().splitlines()) == 1
    assert "unknown" in error and "known" in error

    assert main([str(tmp_path), "--instance", "known"]) == 0
    assert "run" in capsys.readouterr().out

    empty = tmp_path / "empty"
    empty.mkdir()
    assert main([str(empty)]) == 0
    assert "no checkpoints yet" in capsys.readouterr().out.lower()


def test_entries_are_the_index_best_first(tmp_path):
    folder = _fill(tmp_path, [2.0, 5.0, 1.0])
    entries = CheckpointSaver(tmp_path, "inst").entries()
    assert entries == json.loads((folder / "index.json").read_text())
    required = {"score", "file", "run_name", "global_step", "created"}
    assert all(required <= entry.keys() for entry in entries)
    assert os.path.isfile(folder / entries[0]["file"])
