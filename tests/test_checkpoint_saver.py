"""Tests of the best-LTA checkpoint registry (checkpoint_saver.py) on its default database, a SQLite file.

The same code on PostgreSQL, several processes at once and killed writers: tests/test_registry_db.py.
"""

import io
import json
import math
import random
import socket
import sqlite3
import subprocess
import sys
from pathlib import Path

import pytest
import sqlalchemy as sa
import torch

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT))

import checkpoint_saver  # noqa: E402
from checkpoint_saver import (  # noqa: E402
    CheckpointSaver,
    RegistryError,
    entry_bytes,
    export_entry,
    import_folders,
    instance_key,
    leaderboard,
    main,
    read_instance,
    save_atomic,
    without_password,
)

PROTOCOL = {"kind": "continuing", "episodes": 128, "horizon": 40000, "warmup": 2500, "seed": 10000}
OTHER_PROTOCOL = {"kind": "episodic", "episodes": 10, "horizon": 1000, "warmup": 0, "seed": 10000}


def make_saver(root, instance="inst", top_k=5, lower_is_better=False, protocol=PROTOCOL, **kwargs):
    return CheckpointSaver(root, instance, top_k=top_k, lower_is_better=lower_is_better, protocol=protocol,
                           **kwargs)


def tiny_checkpoint(value: float) -> dict:
    return {"policy": {"weight": torch.full((2, 2), float(value))}, "note": "tiny"}


def submit(saver, score, run_name="run", step=1, half_width=0.5):
    return saver.submit(score, tiny_checkpoint(score), run_name, step, half_width)


def stored_rows(root, instance="inst"):
    """Every entry row of the instance as the database holds it, with its checkpoint loaded."""
    engine = sa.create_engine(f"sqlite:///{Path(root) / 'registry.db'}")
    with engine.connect() as connection:
        rows = connection.execute(sa.select(checkpoint_saver.entries_table)
                                  .where(checkpoint_saver.entries_table.c.instance == instance)).all()
    engine.dispose()
    return [{**row._mapping, "checkpoint": torch.load(io.BytesIO(row.checkpoint), weights_only=True)}
            for row in rows]


def assert_registry_holds(root, expected_scores, instance="inst", lower_is_better=False, protocol=PROTOCOL,
                          top_k=None):
    """The instance ranks exactly the expected scores, and the database holds those entries and nothing else,
    each with its own checkpoint."""
    stored = read_instance(root, instance)
    assert stored["protocol"] == protocol and stored["lower_is_better"] is lower_is_better
    if top_k is not None:
        assert stored["top_k"] == top_k
    assert [entry["score"] for entry in stored["entries"]] == expected_scores
    rows = stored_rows(root, instance)
    assert sorted(row["score"] for row in rows) == sorted(expected_scores)
    for row in rows:
        checkpoint = row["checkpoint"]
        assert torch.equal(checkpoint["policy"]["weight"], torch.full((2, 2), row["score"]))
        assert checkpoint["score"] == row["score"] and checkpoint["half_width"] == row["half_width"]
        assert checkpoint["run_name"] == row["run_name"] and checkpoint["global_step"] == row["global_step"]
        assert checkpoint["protocol"] == protocol and checkpoint["instance"] == instance
        assert checkpoint["host"] == row["host"] == socket.gethostname()


def _fill(root, scores, top_k=5, instance="inst"):
    saver = make_saver(root, instance, top_k=top_k)
    for step, score in enumerate(scores):
        submit(saver, score, "filler", step)
    return saver


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
    assert_registry_holds(tmp_path, best_five, top_k=5)


def test_fewer_than_k_submissions_are_all_kept(tmp_path):
    saver = make_saver(tmp_path, top_k=5)
    assert submit(saver, 1.0, step=1)
    assert submit(saver, 3.0, step=2)
    assert_registry_holds(tmp_path, [3.0, 1.0])


def test_equal_scores_keep_the_older_checkpoint(tmp_path):
    saver = make_saver(tmp_path, top_k=2)
    submit(saver, 5.0, "first", 1, half_width=0.5)
    submit(saver, 5.0, "second", 2, half_width=0.4)

    assert not saver.would_enter(5.0)
    assert not submit(saver, 5.0, "third", 3, half_width=0.3)
    assert [entry["run_name"] for entry in saver.entries()] == ["first", "second"]
    assert_registry_holds(tmp_path, [5.0, 5.0])


def test_an_exact_repeat_of_an_entry_is_kept_once_naming_the_earlier(tmp_path):
    saver = make_saver(tmp_path, top_k=5)
    assert submit(saver, -18.69, "first", 5, half_width=0.611)
    assert saver.duplicate_of is None
    # Another run (its own saver, as every process has) whose policy gives the very same evaluation.
    other = make_saver(tmp_path, top_k=5)
    assert not submit(other, -18.69, "second", 7, half_width=0.611)
    assert other.duplicate_of == {"run_name": "first", "global_step": 5}
    assert submit(other, -18.69, "third", 9, half_width=0.612)  # the same mean, another interval: another policy
    assert other.duplicate_of is None
    assert submit(other, -20.0, "fourth", 11, half_width=0.611)
    assert [entry["run_name"] for entry in saver.entries()] == ["first", "third", "fourth"]


@pytest.mark.parametrize("score", [math.nan, math.inf, -math.inf])
def test_non_finite_scores_are_never_saved(tmp_path, score):
    saver = make_saver(tmp_path, top_k=3)
    assert not saver.would_enter(score)
    assert not submit(saver, score)
    assert saver.entries() == [] and read_instance(tmp_path, "inst") is None


def test_lower_is_better_keeps_the_lowest_costs(tmp_path):
    saver = make_saver(tmp_path, "costs", top_k=3, lower_is_better=True)
    for step, cost in enumerate([9.0, 4.0, 7.0, 1.0, 8.0, 2.0]):
        submit(saver, cost, step=step)
    assert not submit(saver, 4.0, step=99)  # ties the 3rd: not better
    assert_registry_holds(tmp_path, [1.0, 2.0, 4.0], "costs", lower_is_better=True)


def test_half_width_is_validated_and_stored(tmp_path):
    saver = make_saver(tmp_path)
    for bad in [-0.1, math.nan, math.inf]:
        with pytest.raises(ValueError, match="half_width"):
            submit(saver, 1.0, half_width=bad)
    assert not submit(saver, math.nan, half_width=math.nan)  # a failed evaluation: not saved
    assert submit(saver, 1.0, half_width=0.25)
    assert saver.entries()[0]["half_width"] == 0.25
    assert_registry_holds(tmp_path, [1.0])


def test_invalid_configuration_is_rejected(tmp_path):
    with pytest.raises(ValueError, match="top_k"):
        make_saver(tmp_path, top_k=0)
    for unsafe in ["../escape", "a/b", "", ".hidden", "with space"]:
        with pytest.raises(ValueError, match="instance_key"):
            make_saver(tmp_path, unsafe)
    for timeout in [0, -1, math.nan, math.inf]:
        with pytest.raises(ValueError, match="lock_timeout"):
            make_saver(tmp_path, lock_timeout=timeout)
    with pytest.raises(TypeError, match="protocol"):
        make_saver(tmp_path, protocol=None)
    with pytest.raises(ValueError, match="protocol"):
        make_saver(tmp_path, protocol={"horizon": math.nan})
    with pytest.raises(TypeError, match="protocol"):
        CheckpointSaver(tmp_path, "inst")  # a protocol is required
    for location, message in [("mysql://user@host/db", "postgresql:// or sqlite:///"),
                              ("sqlite://", "SQLite file"), ("sqlite:///:memory:", "SQLite file")]:
        with pytest.raises(RegistryError, match=message):
            make_saver(location)


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
    assert str(tmp_path) in message and "--registry" in message

    # Also refused at submission (two first runs racing on an empty instance): never mixed.
    assert other.would_enter(0.5)  # left to submit, which says why
    with pytest.raises(RegistryError, match="protocol"):
        other.submit(0.5, tiny_checkpoint(0.5), "other", 1, 0.1)
    assert_registry_holds(tmp_path, [1.0])


def test_protocols_compare_by_value_after_a_json_round_trip(tmp_path):
    protocol = {"horizon": 1000, "seeds": [1, 2]}
    submit(make_saver(tmp_path, protocol=protocol), 1.0)
    same = make_saver(tmp_path, protocol={"seeds": (1, 2), "horizon": 1000.0})
    same.check()
    assert submit(same, 2.0)
    assert_registry_holds(tmp_path, [2.0, 1.0], protocol=protocol)


def test_other_ranking_direction_is_refused(tmp_path):
    submit(make_saver(tmp_path), 1.0)
    with pytest.raises(RegistryError, match="lower_is_better=False.*lower_is_better=True"):
        make_saver(tmp_path, lower_is_better=True).check()


def test_an_empty_instance_accepts_any_protocol_and_check_writes_nothing(tmp_path):
    make_saver(tmp_path).check()
    assert read_instance(tmp_path, "inst") is None  # the check's transaction was rolled back
    other = make_saver(tmp_path, protocol=OTHER_PROTOCOL)
    other.check()
    assert submit(other, 1.0)
    assert_registry_holds(tmp_path, [1.0], protocol=OTHER_PROTOCOL)


# --- top-k semantics -------------------------------------------------------------------------


def test_a_smaller_top_k_deletes_nothing_of_other_runs(tmp_path):
    _fill(tmp_path, [10.0, 20.0, 30.0, 40.0, 50.0], top_k=5)
    small = make_saver(tmp_path, top_k=2)
    small.check()
    assert len(small.entries()) == 5 and read_instance(tmp_path, "inst")["top_k"] == 5

    # A better score displaces only the 5th of the stored k=5, not everything beyond 2.
    assert submit(small, 60.0, "small-k")
    assert_registry_holds(tmp_path, [60.0, 50.0, 40.0, 30.0, 20.0], top_k=5)
    # A score for the 3rd place enters too: the stored k, not this run's, decides.
    assert small.would_enter(35.0)
    assert submit(small, 35.0, "small-k")
    assert_registry_holds(tmp_path, [60.0, 50.0, 40.0, 35.0, 30.0], top_k=5)


def test_a_larger_top_k_raises_the_stored_k(tmp_path):
    _fill(tmp_path, [1.0, 2.0, 3.0], top_k=3)
    large = make_saver(tmp_path, top_k=5)
    assert large.would_enter(0.5)  # below the 3rd, but within this run's 5
    assert submit(large, 0.5, "large")
    assert_registry_holds(tmp_path, [3.0, 2.0, 1.0, 0.5], top_k=5)
    # From now on the instance keeps 5, whoever submits.
    small = make_saver(tmp_path, top_k=3)
    assert small.would_enter(0.75)
    assert submit(small, 0.75, "small")
    assert_registry_holds(tmp_path, [3.0, 2.0, 1.0, 0.75, 0.5], top_k=5)


# --- cost of a submission and the lock --------------------------------------------------------


def test_a_rejected_submission_builds_nothing_and_costs_one_read(tmp_path, monkeypatch):
    saver = make_saver(tmp_path, top_k=1)
    submit(saver, 10.0)
    statements = []
    sa.event.listen(saver.engine, "before_cursor_execute",
                    lambda connection, cursor, statement, *args: statements.append(statement))

    def forbidden(*args, **kwargs):
        raise AssertionError("a rejected submission must not get this far")

    monkeypatch.setattr(checkpoint_saver.torch, "save", forbidden)
    assert not saver.would_enter(3.0)
    assert not saver.submit(3.0, forbidden, "run", 2, 0.1)
    assert len(statements) == 2 and all(statement.startswith("SELECT") for statement in statements)


def test_the_checkpoint_is_built_outside_the_transaction(tmp_path):
    saver = make_saver(tmp_path, top_k=2)
    submit(saver, 1.0)
    other = make_saver(tmp_path, lock_timeout=0.1)

    def factory():
        other.check()  # takes the write lock at once: the submitting saver holds none while building
        return tiny_checkpoint(4.0)

    assert saver.submit(4.0, factory, "run", 2, 0.5)
    assert_registry_holds(tmp_path, [4.0, 1.0])


def test_a_lock_wait_times_out_with_a_clear_message(tmp_path):
    submit(make_saver(tmp_path), 1.0)
    holder = sa.create_engine(f"sqlite:///{tmp_path / 'registry.db'}")
    with holder.connect() as connection:
        connection.exec_driver_sql("BEGIN IMMEDIATE")  # another writer, in the middle of its transaction
        impatient = make_saver(tmp_path, lock_timeout=0.2)
        with pytest.raises(RegistryError) as refused:
            submit(impatient, 2.0)
        connection.rollback()
    holder.dispose()
    message = str(refused.value)
    assert "\n" not in message and "locked" in message and "try again" in message
    assert submit(impatient, 2.0)


def test_losing_the_race_to_create_the_tables_is_retried(tmp_path, monkeypatch):
    # SQLite reports the loser of two processes creating a new registry at once as an OperationalError.
    create_all = checkpoint_saver._schema.create_all
    calls = []

    def lose_once(engine):
        calls.append(engine)
        if len(calls) == 1:
            create_all(engine)
            raise sa.exc.OperationalError("CREATE TABLE registry_entries", {},
                                          sqlite3.OperationalError("table registry_entries already exists"))
        create_all(engine)

    monkeypatch.setattr(checkpoint_saver._schema, "create_all", lose_once)
    submit(make_saver(tmp_path), 1.0)
    assert len(calls) == 2
    assert_registry_holds(tmp_path, [1.0])


def test_save_atomic_round_trips_and_leaves_no_temp_files(tmp_path):
    path = tmp_path / "run" / "best.pt"
    save_atomic({"weight": torch.ones(3), "step": 1}, path)
    save_atomic({"weight": torch.zeros(3), "step": 2}, path)
    loaded = torch.load(path, weights_only=True)
    assert loaded["step"] == 2 and torch.equal(loaded["weight"], torch.zeros(3))
    assert [p.name for p in path.parent.iterdir()] == ["best.pt"]


def test_unreachable_and_passworded_urls_are_one_line_without_the_password():
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]  # nothing listens there once the probe is closed
    url = f"postgresql://user:secret@127.0.0.1:{port}/db"
    with pytest.raises(RegistryError) as refused:
        make_saver(url)
    message = str(refused.value)
    assert "\n" not in message and "secret" not in message and f"user@127.0.0.1:{port}/db" in message
    assert without_password(url) == f"postgresql://user@127.0.0.1:{port}/db"
    assert without_password("runs/checkpoints") == "runs/checkpoints" and without_password(None) is None


# --- instance keys -----------------------------------------------------------------------------

SAFE_KEY_CHARACTERS = set("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789._=,+-")


def assert_safe_name(key: str):
    assert key and set(key) <= SAFE_KEY_CHARACTERS
    assert ".." not in key and not key.startswith(".")
    assert len(key) <= checkpoint_saver.MAX_INSTANCE_KEY_LENGTH


def test_instance_key_is_readable_and_safe():
    assert instance_key("Hopper-v4") == "Hopper-v4"
    key = instance_key("queueing:QueueNetwork-v0", {"instance": "criss-cross"})
    assert key.startswith("queueing_QueueNetwork-v0__instance=criss-cross")
    for unsafe in ["a/b", "a\\b", "x:y z", "../../etc", "tab\there", "\x00", "", "." * 5,
                   "é" * 300, "long-" * 100]:
        assert_safe_name(instance_key(unsafe))
        assert_safe_name(instance_key("Env-v0", {"path": unsafe}))


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
    assert_safe_name(instance_key("Env-v0", problem_instance="my/instance"))


# --- leaderboard and export ----------------------------------------------------------------------


def test_leaderboard_shows_scores_with_ci_protocol_and_host(tmp_path):
    saver = make_saver(tmp_path, "b-instance", top_k=3)
    submit(saver, 12.5, "alpha-run", 1000, half_width=0.75)
    submit(saver, -3.25, "beta-run", 2000, half_width=1.5)
    costs = make_saver(tmp_path, "costs", lower_is_better=True, protocol=OTHER_PROTOCOL)
    submit(costs, 2.0, "cost-run", 1)

    text = leaderboard(tmp_path)
    assert text.index("b-instance") < text.index("costs")
    for expected in ["12.5 ± 0.75", "-3.25 ± 1.5", "alpha-run", "beta-run", "1000", "2000", socket.gethostname(),
                     "higher score is better", "lower score is better", "top 3 kept",
                     "protocol: " + json.dumps(PROTOCOL, sort_keys=True),
                     "protocol: " + json.dumps(OTHER_PROTOCOL, sort_keys=True)]:
        assert expected in text
    assert text.count(json.dumps(PROTOCOL, sort_keys=True)) == 1  # once, in the title
    assert text.index("12.5") < text.index("-3.25")

    only_costs = leaderboard(tmp_path, "costs")
    assert "cost-run" in only_costs and "alpha-run" not in only_costs


def test_leaderboard_lines_do_not_repeat_a_long_instance_key(tmp_path):
    instance = instance_key("queueing:QueueNetwork-v0", {"instance": "reentrant-7", "allocation": "priority",
                                                         "observation": "scaled", "reset_state": "empty" * 10})
    run_name = f"{instance}__ppo_continuous__1__1796080915"
    submit(make_saver(tmp_path, instance), -55.5, run_name)
    text = leaderboard(tmp_path)
    assert text.splitlines()[0].startswith(instance)
    assert "…__ppo_continuous__1__1796080915" in text and text.count(instance) == 1
    assert max(len(line) for line in text.splitlines()) <= 160


def test_instance_is_found_by_key_or_unique_part(tmp_path):
    for name in ["queueing__instance=criss-cross", "queueing__instance=criss-cross-2", "Hopper-v4"]:
        submit(make_saver(tmp_path, name), 1.0, f"run-of-{name}")
    assert "run-of-Hopper-v4" in leaderboard(tmp_path, "opper")
    assert "run-of-queueing__instance=criss-cross-2" in leaderboard(tmp_path, "cross-2")
    # An exact key wins even though it is also part of another key.
    exact = leaderboard(tmp_path, "queueing__instance=criss-cross")
    assert "run-of-queueing__instance=criss-cross " in exact and "criss-cross-2" not in exact
    with pytest.raises(RegistryError) as ambiguous:
        leaderboard(tmp_path, "criss-cross")
    assert "queueing__instance=criss-cross, queueing__instance=criss-cross-2" in str(ambiguous.value)


def test_cli_prints_the_leaderboard_and_fails_cleanly_on_a_missing_registry(tmp_path, capsys):
    submit(make_saver(tmp_path / "ckpt"), 7.75, "cli-run", 42, half_width=0.125)
    shown = subprocess.run([sys.executable, str(REPO_ROOT / "checkpoint_saver.py"), "--registry",
                            str(tmp_path / "ckpt")], capture_output=True, text=True, timeout=60)
    assert shown.returncode == 0, shown.stderr
    assert "7.75 ± 0.125" in shown.stdout and "cli-run" in shown.stdout and "42" in shown.stdout

    assert main(["--registry", str(tmp_path / "nowhere")]) == 2
    error = capsys.readouterr().err
    assert len(error.strip().splitlines()) == 1 and "no registry at" in error and "nowhere" in error
    assert not (tmp_path / "nowhere").exists()  # reading never creates a registry
    other_database = tmp_path / "other" / "registry.db"
    other_database.parent.mkdir()
    sqlite3.connect(other_database).execute("CREATE TABLE unrelated (x)").connection.close()
    assert main(["--registry", f"sqlite:///{other_database}"]) == 2
    assert "no registry in sqlite:///" in capsys.readouterr().err
    assert sa.inspect(sa.create_engine(f"sqlite:///{other_database}")).get_table_names() == ["unrelated"]


def test_cli_instance_errors_are_one_line(tmp_path, capsys):
    for name in ["known-a", "known-b"]:
        submit(make_saver(tmp_path, name), 1.0)
    assert main(["--registry", str(tmp_path), "--instance", "unknown"]) == 2
    error = capsys.readouterr().err
    assert len(error.strip().splitlines()) == 1
    assert "unknown" in error and "known instances: known-a, known-b" in error

    assert main(["--registry", str(tmp_path), "--instance", "known"]) == 2
    error = capsys.readouterr().err
    assert len(error.strip().splitlines()) == 1 and "ambiguous" in error and "known-a, known-b" in error

    assert main(["--registry", str(tmp_path), "--instance", "n-b"]) == 0
    output = capsys.readouterr().out
    assert "known-b" in output and "known-a" not in output


def test_export_writes_the_stored_checkpoint(tmp_path, capsys, monkeypatch):
    saver = _fill(tmp_path, [1.0, 3.0, 2.0])
    monkeypatch.chdir(tmp_path)
    assert main(["export", "ins", "--rank", "2", "--registry", str(tmp_path)]) == 0
    assert "wrote inst-rank2.pt: inst rank 2, score 2" in capsys.readouterr().out
    exported = torch.load(tmp_path / "inst-rank2.pt", weights_only=True)
    assert exported["score"] == 2.0 and torch.equal(exported["policy"]["weight"], torch.full((2, 2), 2.0))
    assert exported["run_name"] == "filler" and exported["protocol"] == PROTOCOL
    assert (tmp_path / "inst-rank2.pt").read_bytes() == entry_bytes(tmp_path, "inst", 2)

    entry, path = export_entry(tmp_path, "inst", 1, tmp_path / "deep" / "best.pt")
    assert entry["score"] == 3.0 and entry["id"] == saver.entries()[0]["id"]
    assert torch.load(path, weights_only=True)["score"] == 3.0

    assert main(["export", "inst", "--rank", "4", "--registry", str(tmp_path)]) == 2
    error = capsys.readouterr().err
    assert len(error.strip().splitlines()) == 1 and "give a rank from 1 to 3" in error


# --- import of folder registries ------------------------------------------------------------------


def write_folder_registry(root, instance, scores, top_k, protocol=PROTOCOL, lower_is_better=False, orphans=()):
    """A folder registry as the version before the database wrote it: index.json (best first) and one file per
    entry holding the checkpoint and its metadata; ``orphans`` are files a killed writer left out of the index."""
    folder = root / instance
    folder.mkdir(parents=True)
    entries = []
    for step, score in enumerate([*scores, *orphans]):
        entry = {"score": score, "half_width": 0.5, "file": f"run-step{step}-{step:08x}.pt", "run_name": "old-run",
                 "global_step": step, "created": 1_700_000_000.0 + step}
        torch.save({**tiny_checkpoint(score), **{key: value for key, value in entry.items() if key != "file"},
                    "instance": instance, "protocol": protocol, "lower_is_better": lower_is_better, "top_k": top_k},
                   folder / entry["file"])
        if step < len(scores):
            entries.append(entry)
    entries.sort(key=lambda entry: entry["score"], reverse=not lower_is_better)
    index = {"protocol": protocol, "top_k": top_k, "lower_is_better": lower_is_better, "entries": entries}
    (folder / "index.json").write_text(json.dumps(index, indent=2))
    return folder


def folder_contents(root):
    return {path.relative_to(root): path.read_bytes() for path in root.rglob("*") if path.is_file()}


def test_import_takes_every_entry_and_orphan_once_and_changes_no_file(tmp_path, capsys):
    old = tmp_path / "old"
    write_folder_registry(old, "inst", [5.0, 4.0, 3.0], top_k=4, orphans=[4.5])
    write_folder_registry(old, "costs", [1.0], top_k=2, protocol=OTHER_PROTOCOL, lower_is_better=True)
    (old / "older").mkdir()  # the version before protocols: refused, the others still imported
    (old / "older" / "index.json").write_text(json.dumps([{"score": 1.0, "file": "x.pt"}]))
    before = folder_contents(old)
    database = tmp_path / "db"

    assert main(["import", str(old), "--registry", str(database)]) == 2
    output = capsys.readouterr().out
    assert "inst: 4 imported, 0 already there, 4 kept (top 4)" in output
    assert "costs: 1 imported" in output and "older: not imported" in output and "untouched" in output
    assert folder_contents(old) == before
    stored = read_instance(database, "inst")
    assert [entry["score"] for entry in stored["entries"]] == [5.0, 4.5, 4.0, 3.0]
    assert stored["top_k"] == 4 and stored["protocol"] == PROTOCOL
    assert all(entry["host"] is None for entry in stored["entries"])  # folders did not record it
    for rank, entry in enumerate(stored["entries"], start=1):
        file = next(old.glob(f"inst/run-step{entry['global_step']}-*.pt"))
        assert entry_bytes(database, "inst", rank) == file.read_bytes()
    assert read_instance(database, "costs")["lower_is_better"] is True

    lines, complete = import_folders(old, database)  # a second import changes nothing
    assert "inst: 0 imported, 4 already there, 4 kept (top 4)" in lines and not complete
    assert [entry["score"] for entry in read_instance(database, "inst")["entries"]] == [5.0, 4.5, 4.0, 3.0]

    # Imported entries rank with new ones, under the imported protocol and k.
    saver = make_saver(database, top_k=2)
    assert not saver.would_enter(3.0) and saver.would_enter(3.5)
    assert submit(saver, 6.0, "new")
    assert [entry["score"] for entry in saver.entries()] == [6.0, 5.0, 4.5, 4.0]


def test_import_into_a_registry_ranked_otherwise_refuses_that_instance(tmp_path):
    old = tmp_path / "old"
    write_folder_registry(old, "inst", [5.0], top_k=3, protocol=OTHER_PROTOCOL)
    submit(make_saver(tmp_path / "db"), 1.0)
    lines, complete = import_folders(old, tmp_path / "db")
    assert not complete and lines[0].startswith("inst: not imported") and "protocol" in lines[0]
    assert_registry_holds(tmp_path / "db", [1.0])


def test_a_missing_registry_points_to_the_import_of_folders(tmp_path, capsys):
    write_folder_registry(tmp_path, "inst", [5.0], top_k=3)
    assert main(["--registry", str(tmp_path)]) == 2
    error = capsys.readouterr().err
    assert len(error.strip().splitlines()) == 1
    assert f"import them with python checkpoint_saver.py import {tmp_path}" in error
