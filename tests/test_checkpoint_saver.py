"""Tests of the best-LTA checkpoint registry (checkpoint_saver.py)."""

import json
import math
import os
import random
import subprocess
import sys
import time
import warnings
from pathlib import Path

import pytest
import torch
from filelock import FileLock, Timeout

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT))

import checkpoint_saver  # noqa: E402
from checkpoint_saver import (  # noqa: E402
    CheckpointSaver,
    RegistryError,
    instance_key,
    leaderboard,
    main,
    read_index,
    resolve_instance,
    save_atomic,
)

PROTOCOL = {"kind": "continuing", "episodes": 128, "horizon": 40000, "warmup": 2500, "seed": 10000}
OTHER_PROTOCOL = {"kind": "episodic", "episodes": 10, "horizon": 1000, "warmup": 0, "seed": 10000}


def make_saver(root, instance="inst", top_k=5, lower_is_better=False, protocol=PROTOCOL, **kwargs):
    return CheckpointSaver(
        root, instance, top_k=top_k, lower_is_better=lower_is_better, protocol=protocol, **kwargs
    )


def tiny_checkpoint(value: float) -> dict:
    return {"policy": {"weight": torch.full((2, 2), float(value))}, "note": "tiny"}


def submit(saver, score, run_name="run", step=1, half_width=0.5):
    return saver.submit(score, tiny_checkpoint(score), run_name, step, half_width)


def checkpoint_files(folder: Path) -> set[str]:
    return {path.name for path in folder.glob("*.pt")}


def temp_files(folder: Path) -> list[str]:
    return [path.name for path in folder.iterdir() if path.name.startswith(".tmp-")]


def read_json_index(folder: Path) -> dict:
    return json.loads((folder / "index.json").read_text())


def lock_is_free(folder: Path) -> bool:
    probe = FileLock(folder / checkpoint_saver.LOCK_NAME, timeout=0)
    try:
        probe.acquire()
    except Timeout:
        return False
    probe.release()
    return True


def assert_folder_consistent(folder: Path, expected_scores: list[float], lower_is_better=False,
                             protocol=PROTOCOL, top_k=None):
    """The index is the expected ranking and matches exactly the .pt files in the folder."""
    index = read_json_index(folder)
    assert index["protocol"] == protocol
    assert index["lower_is_better"] is lower_is_better
    if top_k is not None:
        assert index["top_k"] == top_k
    assert [entry["score"] for entry in index["entries"]] == expected_scores
    assert checkpoint_files(folder) == {entry["file"] for entry in index["entries"]}
    for entry in index["entries"]:
        stored = torch.load(folder / entry["file"], weights_only=True)
        for key in ["score", "half_width", "run_name", "global_step", "created"]:
            assert stored[key] == entry[key]
        assert stored["lower_is_better"] is lower_is_better
        assert stored["protocol"] == protocol
        assert stored["instance"] == folder.name
        assert torch.equal(stored["policy"]["weight"], torch.full((2, 2), stored["score"]))


def _fill(tmp_path, scores, top_k=5, instance="inst") -> Path:
    saver = make_saver(tmp_path, instance, top_k=top_k)
    for step, score in enumerate(scores):
        submit(saver, score, f"run{step}", step, half_width=score / 10)
    return tmp_path / instance


def _fill_costs(tmp_path) -> Path:
    saver = make_saver(tmp_path, "costs", lower_is_better=True, protocol=OTHER_PROTOCOL)
    for step, cost in enumerate([2.0, 1.0]):
        submit(saver, cost, "run", step)
    return tmp_path / "costs"


# --- ranking -------------------------------------------------------------------------------


def test_top_k_over_sequential_runs(tmp_path):
    rng = random.Random(0)
    submitted = []
    for run in range(4):
        # A fresh saver per run, as every training process creates its own.
        saver = make_saver(tmp_path, top_k=5)
        saver.check()
        for step in range(6):
            score = round(rng.uniform(-50, 50), 3)
            expected_entry = len(submitted) < 5 or score > sorted(submitted, reverse=True)[4]
            assert saver.would_enter(score) is expected_entry
            assert submit(saver, score, f"run{run}", step * 1000) is expected_entry
            submitted.append(score)

    best_five = sorted(submitted, reverse=True)[:5]
    assert [entry["score"] for entry in saver.entries()] == best_five
    assert_folder_consistent(tmp_path / "inst", best_five, top_k=5)


def test_fewer_than_k_submissions_are_all_kept(tmp_path):
    saver = make_saver(tmp_path, top_k=5)
    assert submit(saver, 1.0, step=1)
    assert submit(saver, 3.0, step=2)
    assert_folder_consistent(tmp_path / "inst", [3.0, 1.0])


def test_eviction_deletes_the_displaced_file(tmp_path):
    saver = make_saver(tmp_path, top_k=2)
    submit(saver, 1.0, step=1)
    submit(saver, 2.0, step=2)
    worst_file = saver.entries()[-1]["file"]

    assert submit(saver, 3.0, step=3)
    assert not (tmp_path / "inst" / worst_file).exists()
    assert_folder_consistent(tmp_path / "inst", [3.0, 2.0])


def test_equal_scores_keep_the_older_checkpoint(tmp_path):
    saver = make_saver(tmp_path, top_k=2)
    submit(saver, 5.0, "first", 1)
    submit(saver, 5.0, "second", 2)

    assert not saver.would_enter(5.0)
    assert not submit(saver, 5.0, "third", 3)
    assert [entry["run_name"] for entry in saver.entries()] == ["first", "second"]
    assert_folder_consistent(tmp_path / "inst", [5.0, 5.0])


@pytest.mark.parametrize("score", [math.nan, math.inf, -math.inf])
def test_non_finite_scores_are_never_saved(tmp_path, score):
    saver = make_saver(tmp_path, top_k=3)
    assert not saver.would_enter(score)
    assert not submit(saver, score)
    assert saver.entries() == []
    assert checkpoint_files(tmp_path / "inst") == set()


def test_lower_is_better_keeps_the_lowest_costs(tmp_path):
    saver = make_saver(tmp_path, "costs", top_k=3, lower_is_better=True)
    for step, cost in enumerate([9.0, 4.0, 7.0, 1.0, 8.0, 2.0]):
        submit(saver, cost, step=step)
    assert not submit(saver, 4.0, step=99)  # ties the 3rd: not better
    assert_folder_consistent(tmp_path / "costs", [1.0, 2.0, 4.0], lower_is_better=True)


def test_half_width_is_validated_and_stored(tmp_path):
    saver = make_saver(tmp_path)
    for bad in [-0.1, math.nan, math.inf]:
        with pytest.raises(ValueError, match="half_width"):
            submit(saver, 1.0, half_width=bad)
    assert not submit(saver, math.nan, half_width=math.nan)  # a failed evaluation: not saved
    assert submit(saver, 1.0, half_width=0.25)
    assert saver.entries()[0]["half_width"] == 0.25
    assert_folder_consistent(tmp_path / "inst", [1.0])


def test_invalid_configuration_is_rejected(tmp_path):
    with pytest.raises(ValueError, match="top_k"):
        make_saver(tmp_path, top_k=0)
    for unsafe in ["../escape", "a/b", "", ".hidden", "with space"]:
        with pytest.raises(ValueError, match="instance_key"):
            make_saver(tmp_path, unsafe)
    for timeout in [0, -1, math.nan, checkpoint_saver.MAX_LOCK_TIMEOUT + 1]:
        with pytest.raises(ValueError, match="lock_timeout"):
            make_saver(tmp_path, lock_timeout=timeout)
    with pytest.raises(TypeError, match="protocol"):
        make_saver(tmp_path, protocol=None)
    with pytest.raises(ValueError, match="protocol"):
        make_saver(tmp_path, protocol={"horizon": math.nan})
    with pytest.raises(TypeError, match="protocol"):
        CheckpointSaver(tmp_path, "inst")  # a protocol is required


def test_run_names_are_sanitised_into_unique_file_names(tmp_path):
    saver = make_saver(tmp_path, top_k=5)
    submit(saver, 1.0, "../evil run/name", 7)
    submit(saver, 2.0, "../evil run/name", 7)
    files = [entry["file"] for entry in saver.entries()]
    assert len(set(files)) == 2
    for name in files:
        assert "/" not in name and " " not in name and ".." not in name
        assert "step7" in name and name.endswith(".pt")
    assert_folder_consistent(tmp_path / "inst", [2.0, 1.0])


# --- protocol -------------------------------------------------------------------------------


def test_another_protocol_is_refused_up_front_naming_both(tmp_path):
    submit(make_saver(tmp_path), 1.0)
    other = make_saver(tmp_path, protocol=OTHER_PROTOCOL)

    with pytest.raises(RegistryError) as refused:
        other.check()
    message = str(refused.value)
    assert "\n" not in message
    assert json.dumps(PROTOCOL, sort_keys=True) in message
    assert json.dumps(OTHER_PROTOCOL, sort_keys=True) in message
    assert str(tmp_path / "inst") in message and "--checkpoint-dir" in message

    # Also refused at submission (two first runs racing on an empty folder): never mixed.
    with pytest.raises(RegistryError, match="protocol"):
        other.submit(0.5, tiny_checkpoint(0.5), "other", 1, 0.1)
    assert_folder_consistent(tmp_path / "inst", [1.0])
    assert temp_files(tmp_path / "inst") == []


def test_protocols_compare_by_value_after_a_json_round_trip(tmp_path):
    submit(make_saver(tmp_path, protocol={"horizon": 1000, "seeds": [1, 2]}), 1.0)
    same = make_saver(tmp_path, protocol={"seeds": (1, 2), "horizon": 1000.0})
    same.check()
    assert submit(same, 2.0)


def test_other_ranking_direction_is_refused(tmp_path):
    submit(make_saver(tmp_path), 1.0)
    with pytest.raises(RegistryError, match="lower_is_better=False.*lower_is_better=True"):
        make_saver(tmp_path, lower_is_better=True).check()


def test_an_empty_folder_accepts_any_protocol(tmp_path):
    make_saver(tmp_path).check()
    other = make_saver(tmp_path, protocol=OTHER_PROTOCOL)
    other.check()
    assert submit(other, 1.0)
    assert_folder_consistent(tmp_path / "inst", [1.0], protocol=OTHER_PROTOCOL)


def _old_registry(tmp_path) -> Path:
    """A folder as written by the version without evaluation protocols."""
    folder = tmp_path / "inst"
    folder.mkdir()
    entry = {"score": 3.0, "file": "old-step1-0123abcd.pt", "run_name": "old", "global_step": 1,
             "created": 1.0, "lower_is_better": False}
    torch.save({**tiny_checkpoint(3.0), **{k: v for k, v in entry.items() if k != "file"},
                "instance": "inst"}, folder / entry["file"])
    (folder / "index.json").write_text(json.dumps([entry]))
    return folder


def test_an_older_list_format_registry_is_refused_and_kept(tmp_path, capsys):
    folder = _old_registry(tmp_path)
    saver = make_saver(tmp_path)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # refused as such, not taken for a corrupt index
        with pytest.raises(RegistryError) as refused:
            saver.check()
    message = str(refused.value)
    assert "\n" not in message and "older version" in message
    assert "move that folder away" in message and "--checkpoint-dir" in message
    with pytest.raises(RegistryError, match="older version"):
        submit(saver, 10.0)
    with pytest.raises(RegistryError, match="older version"):
        read_index(folder)
    assert "cannot be listed" in leaderboard(tmp_path) and "older version" in leaderboard(tmp_path)
    assert checkpoint_files(folder) == {"old-step1-0123abcd.pt"}

    # Without its index, its files alone are recognised as the older version's.
    (folder / "index.json").unlink()
    with pytest.warns(RuntimeWarning, match="rebuilding"):
        with pytest.raises(RegistryError, match="older version"):
            saver.check()
    assert checkpoint_files(folder) == {"old-step1-0123abcd.pt"}


def test_an_older_empty_index_is_upgraded_silently(tmp_path, recwarn):
    folder = tmp_path / "inst"
    folder.mkdir()
    (folder / "index.json").write_text("[]")
    saver = make_saver(tmp_path)
    saver.check()
    assert saver.entries() == []
    assert submit(saver, 1.0)
    assert_folder_consistent(folder, [1.0])
    assert not [w for w in recwarn if issubclass(w.category, RuntimeWarning)]


# --- top-k semantics -------------------------------------------------------------------------


def test_a_smaller_top_k_deletes_nothing_of_other_runs(tmp_path):
    folder = _fill(tmp_path, [10.0, 20.0, 30.0, 40.0, 50.0], top_k=5)
    files_of_a = {entry["score"]: entry["file"] for entry in read_json_index(folder)["entries"]}

    small = make_saver(tmp_path, top_k=2)
    small.check()
    assert len(small.entries()) == 5
    assert read_index(folder)["top_k"] == 5
    assert checkpoint_files(folder) == set(files_of_a.values())

    # A better score displaces only the 5th of the stored k=5, not everything beyond 2.
    assert submit(small, 60.0, "small-k")
    assert_folder_consistent(folder, [60.0, 50.0, 40.0, 30.0, 20.0], top_k=5)
    assert not (folder / files_of_a[10.0]).exists()
    # A score for the 3rd place enters too: the stored k, not this run's, decides.
    assert small.would_enter(35.0)
    assert submit(small, 35.0, "small-k")
    assert_folder_consistent(folder, [60.0, 50.0, 40.0, 35.0, 30.0], top_k=5)
    assert {files_of_a[s] for s in (30.0, 40.0, 50.0)} <= checkpoint_files(folder)


def test_a_larger_top_k_raises_the_stored_k(tmp_path):
    folder = _fill(tmp_path, [1.0, 2.0, 3.0], top_k=3)
    large = make_saver(tmp_path, top_k=5)
    assert large.would_enter(0.5)  # below the 3rd, but within this run's 5
    assert submit(large, 0.5, "yy-large")  # its file sorts after those of k=3
    assert_folder_consistent(folder, [3.0, 2.0, 1.0, 0.5], top_k=5)
    # From now on the folder keeps 5, whoever submits.
    small = make_saver(tmp_path, top_k=3)
    assert submit(small, 0.75, "zz-small")
    assert_folder_consistent(folder, [3.0, 2.0, 1.0, 0.75, 0.5], top_k=5)
    # Files remember the raised k, so a lost index does not bring back the smaller one.
    (folder / "index.json").unlink()
    with pytest.warns(RuntimeWarning, match="rebuilding"):
        assert read_index(folder)["top_k"] == 5


# --- cost of a submission and the lock --------------------------------------------------------


def test_a_rejected_submission_builds_nothing_and_takes_no_lock(tmp_path, monkeypatch):
    saver = make_saver(tmp_path, top_k=1)
    submit(saver, 10.0)

    def forbidden(*args, **kwargs):
        raise AssertionError("a rejected submission must not get this far")

    monkeypatch.setattr(saver._lock, "acquire", forbidden)
    monkeypatch.setattr(checkpoint_saver.torch, "save", forbidden)
    assert not saver.would_enter(3.0)
    assert not saver.submit(3.0, forbidden, "run", 2, 0.1)


def test_the_checkpoint_is_built_and_written_outside_the_lock(tmp_path, monkeypatch):
    saver = make_saver(tmp_path, top_k=2)
    folder = tmp_path / "inst"
    observed = []
    real_save, real_write_index = checkpoint_saver.torch.save, checkpoint_saver._write_index

    def factory():
        observed.append(("factory", lock_is_free(folder)))
        return tiny_checkpoint(4.0)

    def save(obj, file):
        observed.append(("save", lock_is_free(folder)))
        real_save(obj, file)

    def write_index(*args):
        observed.append(("index", lock_is_free(folder)))  # proves the probe sees the lock
        real_write_index(*args)

    monkeypatch.setattr(checkpoint_saver.torch, "save", save)
    monkeypatch.setattr(checkpoint_saver, "_write_index", write_index)
    assert saver.submit(4.0, factory, "run", 1, 0.2)
    assert observed == [("factory", True), ("save", True), ("index", False)]
    assert_folder_consistent(folder, [4.0])


def test_a_submission_that_no_longer_enters_under_the_lock_leaves_nothing(tmp_path, monkeypatch):
    saver = make_saver(tmp_path, top_k=1)
    rival = make_saver(tmp_path, top_k=1)
    submit(saver, 1.0)
    real_acquire = saver._lock.acquire

    def acquire_after_a_better_rival(*args, **kwargs):
        submit(rival, 9.0, "rival")  # lands between the pre-check and the lock
        return real_acquire(*args, **kwargs)

    monkeypatch.setattr(saver._lock, "acquire", acquire_after_a_better_rival)
    assert not submit(saver, 5.0)
    assert_folder_consistent(tmp_path / "inst", [9.0])
    assert temp_files(tmp_path / "inst") == []


def test_a_live_writers_temp_file_survives_other_writers(tmp_path, monkeypatch):
    saver = make_saver(tmp_path, top_k=5)
    rival = make_saver(tmp_path, top_k=5)
    folder = tmp_path / "inst"
    real_acquire = saver._lock.acquire
    seen_while_waiting = []

    def acquire_after_a_rival(*args, **kwargs):
        seen_while_waiting.append(temp_files(folder))
        submit(rival, 2.0, "rival")  # repairs and cleans the folder under the lock
        return real_acquire(*args, **kwargs)

    monkeypatch.setattr(saver._lock, "acquire", acquire_after_a_rival)
    assert submit(saver, 1.0)
    assert len(seen_while_waiting[0]) == 1  # our checkpoint, written before the lock
    assert_folder_consistent(folder, [2.0, 1.0])


def test_only_old_temp_files_are_removed(tmp_path):
    folder = _fill(tmp_path, [1.0])
    fresh, stale = folder / ".tmp-live.pt.0123", folder / ".tmp-crashed.pt.4567"
    fresh.write_bytes(b"being written")
    stale.write_bytes(b"partial")
    long_ago = time.time() - checkpoint_saver.STALE_TEMP_SECONDS - 60
    os.utime(stale, (long_ago, long_ago))

    make_saver(tmp_path).check()
    assert fresh.exists() and not stale.exists()


def test_a_lock_wait_times_out_with_a_clear_message(tmp_path):
    saver = make_saver(tmp_path, lock_timeout=0.1)
    submit(saver, 1.0)
    holder = FileLock(tmp_path / "inst" / checkpoint_saver.LOCK_NAME)
    with holder:
        for attempt in [saver.check, saver.entries, lambda: submit(saver, 2.0)]:
            with pytest.raises(RegistryError) as timed_out:
                attempt()
            message = str(timed_out.value)
            assert "\n" not in message
            assert str(tmp_path / "inst" / "index.json.lock") in message
            assert "another process holds it" in message and "0.1 s" in message
    assert temp_files(tmp_path / "inst") == []
    assert_folder_consistent(tmp_path / "inst", [1.0])


# --- repair -----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "corrupt",
    [
        lambda index: "{not json",
        lambda index: json.dumps({**index, "protocol": None}),
        lambda index: json.dumps({k: v for k, v in index.items() if k != "top_k"}),
        lambda index: json.dumps({**index, "entries": {"0": index["entries"][0]}}),
        lambda index: json.dumps(
            {**index, "entries": [{k: v for k, v in e.items() if k != "half_width"}
                                  for e in index["entries"]]}),
        lambda index: json.dumps(
            {**index, "entries": [{**e, "half_width": -1.0} for e in index["entries"]]}),
        lambda index: json.dumps(
            {**index, "entries": index["entries"] + [{**index["entries"][0], "file": "gone.pt"}]}),
    ],
    ids=["garbage", "no-protocol", "no-top-k", "entries-not-a-list", "no-half-width",
         "negative-half-width", "missing-file"],
)
def test_corrupt_index_is_rebuilt_from_the_files(tmp_path, corrupt):
    folder = _fill(tmp_path, [3.0, 1.0, 2.0])
    index_path = folder / "index.json"
    original = read_json_index(folder)
    index_path.write_text(corrupt(original))

    with pytest.warns(RuntimeWarning, match="rebuilding") as caught:
        entries = make_saver(tmp_path).entries()
    assert str(folder) in str(caught[0].message)
    assert [entry["score"] for entry in entries] == [3.0, 2.0, 1.0]
    assert read_json_index(folder) == original
    assert_folder_consistent(folder, [3.0, 2.0, 1.0])


def test_a_lost_index_is_rebuilt_with_half_width_protocol_and_k(tmp_path):
    folder = _fill(tmp_path, [1.0, 4.0, 2.0, 3.0], top_k=4)
    original = read_json_index(folder)
    assert [entry["half_width"] for entry in original["entries"]] == [0.4, 0.3, 0.2, 0.1]
    (folder / "index.json").unlink()

    saver = make_saver(tmp_path, top_k=2)
    with pytest.warns(RuntimeWarning, match="index.json is missing"):
        saver.check()
    assert read_json_index(folder) == original  # k=4 from the files, not this saver's 2


def test_a_lost_index_over_files_of_different_protocols_is_refused(tmp_path):
    folder = _fill(tmp_path, [1.0, 2.0])
    intruder = make_saver(tmp_path / "elsewhere", "inst", protocol=OTHER_PROTOCOL)
    submit(intruder, 5.0)
    for path in (tmp_path / "elsewhere" / "inst").glob("*.pt"):
        os.replace(path, folder / path.name)
    (folder / "index.json").unlink()

    with pytest.warns(RuntimeWarning), pytest.raises(RegistryError) as refused:
        read_index(folder)
    message = str(refused.value)
    assert "\n" not in message and "move the checkpoint files that do not belong" in message
    assert json.dumps(PROTOCOL, sort_keys=True) in message
    assert json.dumps(OTHER_PROTOCOL, sort_keys=True) in message
    assert len(checkpoint_files(folder)) == 3


def test_rebuild_sets_unreadable_files_aside(tmp_path):
    folder = _fill(tmp_path, [1.0, 2.0])
    (folder / "index.json").write_text("{")
    (folder / "truncated.pt").write_bytes(b"\x80\x02garbage")
    torch.save({"weights": torch.zeros(1)}, folder / "foreign.pt")  # no registry metadata

    with pytest.warns(RuntimeWarning) as caught:
        entries = make_saver(tmp_path).entries()
    messages = " ".join(str(warning.message) for warning in caught)
    assert "truncated.pt" in messages and "foreign.pt" in messages
    assert [entry["score"] for entry in entries] == [2.0, 1.0]
    assert_folder_consistent(folder, [2.0, 1.0])
    assert (folder / "truncated.pt.unreadable").exists()
    assert (folder / "foreign.pt.unreadable").exists()


def test_orphans_are_merged_and_trimmed_only_by_the_next_submission(tmp_path):
    folder = _fill(tmp_path, [1.0, 2.0], top_k=2)
    template = torch.load(folder / read_json_index(folder)["entries"][0]["file"], weights_only=True)
    # Writers killed after moving a checkpoint in but before updating the index.
    for score in (5.0, 0.5):
        save_atomic({**template, **tiny_checkpoint(score), "score": score,
                     "run_name": f"orphan{score}"}, folder / f"orphan{score}.pt")

    with pytest.warns(RuntimeWarning, match="missing from index.json"):
        entries = make_saver(tmp_path, top_k=2).entries()
    assert [entry["run_name"] for entry in entries] == ["orphan5.0", "run1", "run0", "orphan0.5"]
    assert_folder_consistent(folder, [5.0, 2.0, 1.0, 0.5], top_k=2)  # reading deleted nothing

    assert submit(make_saver(tmp_path, top_k=2), 3.0)
    assert_folder_consistent(folder, [5.0, 3.0], top_k=2)


def test_read_index_rebuilds_without_deleting(tmp_path):
    folder = _fill(tmp_path, [1.0, 3.0, 2.0], top_k=2)
    assert [entry["score"] for entry in read_index(folder)["entries"]] == [3.0, 2.0]
    (folder / "index.json").unlink()
    (folder / "extra.pt").write_bytes(b"garbage")
    with pytest.warns(RuntimeWarning, match=str(folder.name)):
        index = read_index(folder)
    assert index["protocol"] == PROTOCOL and index["top_k"] == 2
    assert [entry["score"] for entry in index["entries"]] == [3.0, 2.0]

    costs = _fill_costs(tmp_path)
    (costs / "index.json").write_text("garbage")
    with pytest.warns(RuntimeWarning):
        assert [entry["score"] for entry in read_index(costs)["entries"]] == [1.0, 2.0]
    assert read_index(costs)["lower_is_better"] is True

    (tmp_path / "empty").mkdir()
    assert read_index(tmp_path / "empty") is None


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
saver = CheckpointSaver(root, "race", top_k=5, protocol={"kind": "race"})
saver.check()
print("ready", flush=True)
while not os.path.exists(start_signal):  # start together to maximise contention
    time.sleep(0.002)
rng = random.Random(seed)
scores = [rng.uniform(0, 100) for _ in range(10)]
for step, score in enumerate(scores):
    factory = lambda score=score: {"policy": {"weight": torch.full((2, 2), score)}}
    saver.submit(score, factory, f"proc{seed}", step, score / 100)
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
        assert "Warning" not in stderr  # no index was ever found corrupt or incomplete
        submitted += json.loads(stdout)
    assert len(submitted) == 40
    best_five = sorted(submitted, reverse=True)[:5]
    folder = tmp_path / "race"
    index = read_json_index(folder)
    assert [entry["score"] for entry in index["entries"]] == best_five
    assert checkpoint_files(folder) == {entry["file"] for entry in index["entries"]}
    assert temp_files(folder) == []
    for entry in index["entries"]:
        stored = torch.load(folder / entry["file"], weights_only=True)
        assert stored["score"] == entry["score"]
        assert stored["half_width"] == entry["half_width"] == entry["score"] / 100
        assert stored["run_name"] == entry["run_name"]
        assert torch.equal(stored["policy"]["weight"], torch.full((2, 2), entry["score"]))


# --- instance keys -----------------------------------------------------------------------------

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


# --- leaderboard ---------------------------------------------------------------------------------


def test_leaderboard_shows_scores_with_ci_protocol_and_full_paths(tmp_path):
    saver = make_saver(tmp_path, "b-instance", top_k=3)
    submit(saver, 12.5, "alpha-run", 1000, half_width=0.75)
    submit(saver, -3.25, "beta-run", 2000, half_width=1.5)
    _fill_costs(tmp_path)

    text = leaderboard(tmp_path)
    assert text.index("b-instance") < text.index("costs")
    for expected in ["12.5 ± 0.75", "-3.25 ± 1.5", "alpha-run", "beta-run", "1000", "2000",
                     "higher score is better", "lower score is better", "top 3 kept",
                     "protocol: " + json.dumps(PROTOCOL, sort_keys=True),
                     "protocol: " + json.dumps(OTHER_PROTOCOL, sort_keys=True)]:
        assert expected in text
    assert text.count(json.dumps(PROTOCOL, sort_keys=True)) == 1  # once, in the title
    assert text.index("12.5") < text.index("-3.25")
    for entry in saver.entries():
        full_path = str((tmp_path / "b-instance" / entry["file"]).absolute())
        assert os.path.isabs(full_path) and full_path in text

    only_costs = leaderboard(tmp_path, "costs")
    assert "costs" in only_costs and "alpha-run" not in only_costs


def test_instance_is_found_by_key_or_unique_part(tmp_path):
    for name in ["queueing__instance=criss-cross", "queueing__instance=criss-cross-2", "Hopper-v4"]:
        submit(make_saver(tmp_path, name), 1.0, f"run-of-{name}")
    assert resolve_instance(tmp_path, "Hopper") == "Hopper-v4"
    assert resolve_instance(tmp_path, "cross-2") == "queueing__instance=criss-cross-2"
    # An exact key wins even though it is also part of another key.
    assert resolve_instance(tmp_path, "queueing__instance=criss-cross") == (
        "queueing__instance=criss-cross")
    with pytest.raises(RegistryError) as ambiguous:
        resolve_instance(tmp_path, "criss-cross")
    assert "queueing__instance=criss-cross, queueing__instance=criss-cross-2" in str(
        ambiguous.value)
    assert "run-of-Hopper-v4" in leaderboard(tmp_path, "opper")
    with pytest.raises(FileNotFoundError, match="does not exist"):
        resolve_instance(tmp_path / "nowhere", "Hopper")


def test_cli_prints_the_leaderboard_and_fails_cleanly_on_a_missing_root(tmp_path):
    submit(make_saver(tmp_path / "ckpt"), 7.75, "cli-run", 42, half_width=0.125)
    shown = subprocess.run(
        [sys.executable, str(REPO_ROOT / "checkpoint_saver.py"), str(tmp_path / "ckpt")],
        capture_output=True, text=True, timeout=60,
    )
    assert shown.returncode == 0, shown.stderr
    assert "7.75 ± 0.125" in shown.stdout and "cli-run" in shown.stdout and "42" in shown.stdout

    missing = subprocess.run(
        [sys.executable, str(REPO_ROOT / "checkpoint_saver.py"), str(tmp_path / "nowhere")],
        capture_output=True, text=True, timeout=60,
    )
    assert missing.returncode == 2
    assert "Traceback" not in missing.stderr
    assert len(missing.stderr.strip().splitlines()) == 1
    assert "nowhere" in missing.stderr and "does not exist" in missing.stderr


def test_cli_instance_errors_are_one_line(tmp_path, capsys):
    for name in ["known-a", "known-b"]:
        submit(make_saver(tmp_path, name), 1.0)
    assert main([str(tmp_path), "--instance", "unknown"]) == 2
    error = capsys.readouterr().err
    assert len(error.strip().splitlines()) == 1
    assert "unknown" in error and "known instances: known-a, known-b" in error

    assert main([str(tmp_path), "--instance", "known"]) == 2
    error = capsys.readouterr().err
    assert len(error.strip().splitlines()) == 1
    assert "ambiguous" in error and "known-a, known-b" in error

    assert main([str(tmp_path), "--instance", "n-b"]) == 0
    output = capsys.readouterr().out
    assert "known-b" in output and "known-a" not in output

    empty = tmp_path / "empty-root"
    empty.mkdir()
    assert main([str(empty)]) == 0
    assert "no checkpoints yet" in capsys.readouterr().out.lower()


def test_entries_are_the_index_best_first(tmp_path):
    folder = _fill(tmp_path, [2.0, 5.0, 1.0])
    entries = make_saver(tmp_path).entries()
    assert entries == read_json_index(folder)["entries"]
    required = {"score", "half_width", "file", "run_name", "global_step", "created"}
    assert all(required <= entry.keys() for entry in entries)
    assert os.path.isfile(folder / entries[0]["file"])
