"""The registry on both of its databases, a SQLite file and a real PostgreSQL server (from the pgserver wheel):
processes submitting at once, a writer killed mid-submit, and the trainer refusing what it cannot use."""

import io
import json
import multiprocessing
import os
import random
import signal
import time

import pytest
import sqlalchemy as sa
import torch

import checkpoint_saver
import ppo_continuous
from checkpoint_saver import CheckpointSaver, entries_table, entry_bytes, instances_table, read_instance
from tests.conftest import FAST, FAST_EVAL, fast_args, one_line_error, run_cli, run_dirs
from tests.postgres_server import bundled_binaries, free_port, postgres_server

PROTOCOL = {"kind": "race"}


@pytest.fixture(scope="module")
def postgres_url():
    if bundled_binaries() is None:
        pytest.skip("no PostgreSQL server binaries: pip install -r requirements.txt")
    with postgres_server() as url:
        yield url


@pytest.fixture(params=["sqlite", "postgresql"])
def registry(request, tmp_path):
    """A registry location on each database; PostgreSQL instances are told apart by test name."""
    if request.param == "sqlite":
        return str(tmp_path / "checkpoints")
    return request.getfixturevalue("postgres_url")


@pytest.fixture
def instance(request):
    return request.node.name.replace("[", "-").replace("]", "")


def database_rows(location, instance):
    """What the database holds for the instance: its stored row, and every entry row (checkpoint as bytes)."""
    url = location if "://" in location else f"sqlite:///{location}/registry.db"
    engine = sa.create_engine(url)
    with engine.connect() as connection:
        stored = connection.execute(sa.select(instances_table).where(instances_table.c.instance == instance)).one()
        rows = connection.execute(sa.select(entries_table).where(entries_table.c.instance == instance)).all()
    engine.dispose()
    return stored, sorted((dict(row._mapping) for row in rows), key=lambda row: row["id"])


# Writers are fresh interpreters: a fork of a process with threads (torch's OpenMP pool, a pytest-xdist worker's
# I/O thread) can inherit a lock held by one of them and hang. They import torch before they race (`ready`).
SPAWN = multiprocessing.get_context("spawn")


def race(location, instance, seed, ready, start, results):
    trim = checkpoint_saver._trim

    def slow_trim(*args):  # a writer slow to finish its transaction: the others must wait for it
        time.sleep(0.005)
        trim(*args)

    checkpoint_saver._trim = slow_trim  # in this writer process only
    saver = CheckpointSaver(location, instance, top_k=5, protocol=PROTOCOL)
    saver.check()
    ready.release()
    start.wait()  # all together, for the most contention
    # Rising scores, so that most submissions enter and their transactions overlap.
    rng = random.Random(seed)
    scores = [step + rng.random() for step in range(10)]
    most_seen = 0
    for step, score in enumerate(scores):
        saver.submit(score, lambda score=score: {"weight": torch.full((128, 128), score)}, f"proc{seed}", step,
                     score / 100)
        most_seen = max(most_seen, len(saver.entries()))
    results.put((scores, most_seen))


def test_four_processes_at_once_end_with_the_exact_top_k(registry, instance):
    ready, start, results = SPAWN.Semaphore(0), SPAWN.Event(), SPAWN.Queue()
    processes = [SPAWN.Process(target=race, args=(registry, instance, seed, ready, start, results))
                 for seed in range(4)]
    for process in processes:
        process.start()
    try:
        for _ in processes:
            assert ready.acquire(timeout=60)
        start.set()
        reported = [results.get(timeout=120) for _ in processes]
        for process in processes:
            process.join(timeout=60)
            assert process.exitcode == 0
    finally:
        for process in processes:
            process.kill()
    submitted = [score for scores, _ in reported for score in scores]
    best_five = sorted(submitted, reverse=True)[:5]
    assert len(submitted) == 40 and max(most_seen for _, most_seen in reported) == 5  # never more than k
    assert [entry["score"] for entry in read_instance(registry, instance)["entries"]] == best_five
    stored, rows = database_rows(registry, instance)
    assert stored.top_k == 5 and json.loads(stored.protocol) == PROTOCOL
    assert sorted((row["score"] for row in rows), reverse=True) == best_five  # nothing else
    for row in rows:
        checkpoint = torch.load(io.BytesIO(row["checkpoint"]), weights_only=True)
        assert row["half_width"] == row["score"] / 100 == checkpoint["half_width"]
        assert torch.equal(checkpoint["weight"], torch.full((128, 128), row["score"]))


def submit_and_hang_before_commit(location, instance, in_transaction):
    trim = checkpoint_saver._trim

    def trim_then_hang(*args):  # the entry is in and the displaced one out, not yet committed
        trim(*args)
        in_transaction.set()
        time.sleep(600)

    checkpoint_saver._trim = trim_then_hang  # in this writer process only
    saver = CheckpointSaver(location, instance, top_k=2, protocol=PROTOCOL)
    saver.submit(99.0, {"weight": torch.full((64, 64), 99.0)}, "killed", 3, 0.5)


def test_a_writer_killed_mid_submit_leaves_the_registry_as_before(registry, instance):
    saver = CheckpointSaver(registry, instance, top_k=2, protocol=PROTOCOL, lock_timeout=10)
    for step, score in enumerate([2.0, 1.0]):
        saver.submit(score, {"weight": torch.full((64, 64), score)}, "before", step, 0.1)
    before = database_rows(registry, instance)
    in_transaction = SPAWN.Event()
    writer = SPAWN.Process(target=submit_and_hang_before_commit, args=(registry, instance, in_transaction))
    writer.start()
    try:
        assert in_transaction.wait(timeout=60)
        os.kill(writer.pid, signal.SIGKILL)
        writer.join(timeout=30)
        assert writer.exitcode == -signal.SIGKILL
    finally:
        writer.kill()
    assert database_rows(registry, instance) == before
    # Nothing stays locked: the next writer gets in at once and finds the top-k intact.
    started = time.monotonic()
    assert saver.submit(3.0, {"weight": torch.full((64, 64), 3.0)}, "after", 9, 0.1)
    assert time.monotonic() - started < 10
    assert [entry["score"] for entry in saver.entries()] == [3.0, 2.0]
    assert len(database_rows(registry, instance)[1]) == 2


def test_a_second_protocol_on_an_instance_is_refused_in_one_line(registry, instance, indir, capsys):
    """Through the trainer: a run evaluated otherwise is refused before training, and changes nothing."""
    # The test server trusts any password; checkpoints must not keep it.
    registry = registry.replace("postgres@", "postgres:secret@")
    summary = ppo_continuous.train(fast_args(total_timesteps=256, registry=registry, problem_instance=instance))
    before = read_instance(registry, instance)
    assert before["protocol"]["horizon"] == 50 and before["entries"]
    saved = torch.load(summary["run_dir"] / "best.pt", weights_only=True)["args"]["registry"]
    assert saved == registry.replace(":secret", "") and b"secret" not in entry_bytes(registry, instance)
    assert ppo_continuous.main(["--env-id", "Pendulum-v1", *FAST, "--eval-episodes", "2", "--eval-horizon", "60",
                                "--total-timesteps", "256", "--registry", registry,
                                "--problem-instance", instance]) == 2
    error = one_line_error(capsys.readouterr().err)
    assert '"horizon": 50' in error and '"horizon": 60' in error and instance in error
    assert read_instance(registry, instance) == before and len(run_dirs(indir)) == 1


def test_an_unreachable_registry_fails_before_training_in_one_line(workdir):
    url = f"postgresql://user:secret@127.0.0.1:{free_port()}/registry"
    result = run_cli("--env-id", "Pendulum-v1", *FAST, *FAST_EVAL, "--total-timesteps", "256", "--registry", url,
                     cwd=workdir)
    assert result.returncode == 2
    error = one_line_error(result.stderr)
    assert "cannot use the registry postgresql://user@127.0.0.1" in error and "secret" not in error
    assert run_dirs(workdir) == [] and result.stdout == ""


def test_savers_leave_no_connection_open(postgres_url):
    """A sweep worker makes a saver per run: each closes its connections when it goes, not at exit."""
    def client_connections():
        engine = sa.create_engine(postgres_url, poolclass=sa.NullPool)
        with engine.connect() as connection:
            count = connection.exec_driver_sql("SELECT count(*) FROM pg_stat_activity "
                                               "WHERE backend_type = 'client backend'").scalar()
        return count - 1  # this one

    before = client_connections()
    for run in range(10):
        saver = CheckpointSaver(postgres_url, "connections", protocol=PROTOCOL)
        saver.check()
        saver.submit(float(run), {"weight": torch.zeros(1)}, f"run{run}", 1, 0.1)
    del saver
    assert client_connections() == before
