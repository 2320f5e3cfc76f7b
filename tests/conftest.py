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


def run_cli(*args, cwd, timeout=300, script=SCRIPT, env=None):
    env = {**os.environ, "PYTHONPATH": str(REPO), **(env or {})}
    return subprocess.run([sys.executable, str(script), *map(str, args)], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=timeout)


def run_dirs(cwd):
    return sorted(path for path in (Path(cwd) / "runs").iterdir() if path.name != "checkpoints")


def scalars(run_dir):
    accumulator = EventAccumulator(str(run_dir), size_guidance={"scalars": 0})
    accumulator.Reload()
    return {tag: [(event.step, event.value) for event in accumulator.Scalars(tag)]
            for tag in accumulator.Tags()["scalars"]}


@pytest.fixture
def workdir(tmp_path):
    return tmp_path
