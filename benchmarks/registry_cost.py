"""What a submission to the checkpoint registry costs, on SQLite and on PostgreSQL.

    python benchmarks/registry_cost.py                          # SQLite file, and a local PostgreSQL (pgserver)
    python benchmarks/registry_cost.py --registry postgresql://user@host/db   # a server of your own, too

Two costs, timed one submission at a time with a checkpoint of the trainer's default agent for criss-cross (3
inputs, 3 actions, 64 x 64 actor and critic, with Adam's state; its size is printed):
- rejected: `submit` of a score that cannot enter the top-k (below the k-th): the pre-check only, one indexed
  query; the checkpoint is never built. The registry holds 5 entries of this instance and 5 of each of 50 others.
- accepted: `submit` of a score that enters (each one better than the last): serialising the checkpoint and the
  transaction that stores it, displaces the k+1-th and commits (SQLite syncs the file to disk; the local test
  server runs with fsync=off, so its figure leaves out the disk).
Each figure is the median over the repeats with its distribution-free 95% confidence interval (order statistics
of the binomial(n, 1/2)); wall-clock time on whatever else the machine is running, so compare, don't quote to
the microsecond.
"""

import argparse
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import scipy.stats
import torch

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from checkpoint_saver import CheckpointSaver, _serialise  # noqa: E402
from ppo_continuous import Agent  # noqa: E402
from tests.postgres_server import bundled_binaries, postgres_server  # noqa: E402

PROTOCOL = {"kind": "continuing", "episodes": 128, "horizon": 20000, "warmup": 2500, "seed": 1000000}
OTHER_INSTANCES, TOP_K = 50, 5


def trainer_checkpoint():
    """A checkpoint as the trainer stores it, of the default agent for criss-cross."""
    agent = Agent(obs_size=3, action_size=3, hidden_sizes=(64, 64))
    optimizer = torch.optim.Adam(agent.parameters())
    _, log_prob, _, value = agent.get_action_and_value(torch.zeros(1, 3))
    (value - log_prob).sum().backward()
    optimizer.step()  # Adam's moments exist from the first step on
    return {"agent": agent.state_dict(), "obs_size": 3, "action_size": 3, "obs_rms": None, "reward_rms": None,
            "optimizers": [optimizer.state_dict()], "args": {"hidden_sizes": [64, 64]}, "counters": {}}


def median_interval(seconds):
    """The median and its distribution-free 95% CI, in milliseconds."""
    values, n = np.sort(np.asarray(seconds) * 1000), len(seconds)
    low, high = scipy.stats.binom.interval(0.95, n, 0.5)
    return np.median(values), values[max(int(low) - 1, 0)], values[min(int(high), n - 1)]


def measure(location, repeats):
    checkpoint = trainer_checkpoint()
    for index in range(OTHER_INSTANCES):
        other = CheckpointSaver(location, f"other-{index}", top_k=TOP_K, protocol=PROTOCOL)
        for step in range(TOP_K):
            other.submit(float(step), checkpoint, "filler", step, 0.1)
    saver = CheckpointSaver(location, "criss-cross", top_k=TOP_K, protocol=PROTOCOL)
    for step in range(TOP_K):
        saver.submit(100.0 + step, checkpoint, "filler", step, 0.1)
    rejected, accepted = [], []
    for _ in range(repeats):
        start = time.perf_counter()
        assert not saver.submit(0.0, lambda: checkpoint, "rejected", 0, 0.1)
        rejected.append(time.perf_counter() - start)
    for step in range(repeats):
        start = time.perf_counter()
        assert saver.submit(1000.0 + step, checkpoint, "accepted", step, 0.1)
        accepted.append(time.perf_counter() - start)
    assert len(saver.entries()) == TOP_K
    return rejected, accepted


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--registry", action="append", default=[], help="also measure this database URL")
    parser.add_argument("--repeats", type=int, default=200)
    args = parser.parse_args()
    size = len(_serialise(trainer_checkpoint()))
    print(f"checkpoint: {size / 1024:.0f} KiB; median [95% CI] over {args.repeats} submissions, milliseconds")
    print(f"{'registry':<32} {'rejected score':>24} {'accepted score':>24}")

    def report(name, location):
        rejected, accepted = measure(location, args.repeats)
        cells = ["{:.3f} [{:.3f}, {:.3f}]".format(*median_interval(times)) for times in (rejected, accepted)]
        print(f"{name:<32} {cells[0]:>24} {cells[1]:>24}", flush=True)

    with tempfile.TemporaryDirectory() as folder:
        report("SQLite file (default)", folder)
    if bundled_binaries() is not None:
        with postgres_server() as url:
            report("PostgreSQL, local (pgserver)", url)
    for url in args.registry:
        report(url.split("@")[-1], url)


if __name__ == "__main__":
    main()
