import os
import subprocess
import sys
from pathlib import Path

import pytest
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

REPO = Path(__file__).resolve().parent.parent
SCRIPT = REPO / "ppo_continuous.py"
# Small enough to run in seconds, large enough to exercise every part of the loop.
FAST = ["--num-envs", "2", "--num-steps", "128", "--num-minibatches", "4", "--update-epochs", "2"]
# A cheap evaluation protocol, where the protocol itself is not the point of the test.
FAST_EVAL = ["--eval-episodes", "2", "--eval-horizon", "50"]
FAST_OPTIONS = dict(num_envs=2, num_steps=128, num_minibatches=4, update_epochs=2, eval_episodes=2, eval_horizon=50)


def run_cli(*args, cwd, timeout=300, script=SCRIPT, env=None):
    env = {**os.environ, "PYTHONPATH": str(REPO), **(env or {})}
    return subprocess.run([sys.executable, str(script), *map(str, args)], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=timeout)


def run_dirs(cwd):
    runs = Path(cwd) / "runs"
    if not runs.exists():
        return []
    return sorted(path for path in runs.iterdir() if path.name != "checkpoints")


def scalars(run_dir):
    accumulator = EventAccumulator(str(run_dir), size_guidance={"scalars": 0})
    accumulator.Reload()
    return {tag: [(event.step, event.value) for event in accumulator.Scalars(tag)]
            for tag in accumulator.Tags()["scalars"]}


def values(logged, tag):
    return [value for _, value in logged[tag]]


def fast_args(**options):
    """`Args` for a quick in-process `train()` run (Pendulum by default)."""
    from ppo_continuous import Args
    return Args(**{"env_id": "Pendulum-v1", "total_timesteps": 512, **FAST_OPTIONS, **options})


def one_line_error(stderr):
    """The single `error: ...` line of a refused command, or fail."""
    lines = [line for line in stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), stderr
    assert "Traceback" not in stderr
    return lines[0]


@pytest.fixture
def workdir(tmp_path):
    return tmp_path


@pytest.fixture
def indir(tmp_path, monkeypatch):
    """A fresh working directory for in-process runs (they write runs/ relative to it)."""
    monkeypatch.chdir(tmp_path)
    return tmp_path


@pytest.fixture(autouse=True, scope="session")
def exact_cache(tmp_path_factory):
    """The exact solver's cache of optima lives under $XDG_CACHE_HOME: a fresh one for the tests, never the user's."""
    previous = os.environ.get("XDG_CACHE_HOME")
    os.environ["XDG_CACHE_HOME"] = str(tmp_path_factory.mktemp("cache"))
    yield Path(os.environ["XDG_CACHE_HOME"])
    if previous is None:
        os.environ.pop("XDG_CACHE_HOME")
    else:
        os.environ["XDG_CACHE_HOME"] = previous
