"""queueing/eventsim.py: the event-by-event long-run simulator against exact values of the same chain."""

import subprocess
import sys

import numpy as np
import pytest

from queueing import exact
from queueing.baselines import make_policy, priority_policy
from queueing.env import Network
from queueing.eventsim import event_long_run, index_rule
from tests.conftest import REPO

# Continuous time, routing (buffer 0 feeds buffer 1) and two servers, light enough for a small truncation.
ROUTED = {"name": "routed-ct", "time": "continuous", "arrival_rates": [0.3, 0.0, 0.25],
          "service_rates": [1.5, 1.0, 1.2], "holding_costs": [1.0, 2.0, 1.5], "servers": [[0, 2], [1]],
          "routing": [[0, 1, 0], [0, 0, 0], [0, 0, 0]]}


def exact_cost(network, policy):
    return -exact.gap_until_converged(network, 30, policy, 0.0005).policy.lta_return


@pytest.mark.parametrize("order", [[0, 2, 1], [2, 0, 1]])
def test_a_static_priority_costs_its_exact_value(order):
    network = Network.from_instance(ROUTED)
    value = exact_cost(network, priority_policy(network, order))
    result = event_long_run(network, order=order, seed=3, copies=200, precision=0.005, first_horizon=4000)
    assert result.relative_half_width <= 0.005 and result.stationary
    assert abs(-result.lta_return - value) <= 1.5 * result.half_width, (order, result, value)


def test_a_policy_function_costs_its_exact_value_under_the_networks_allocation_rule():
    # MaxWeight is state-dependent, so it runs as a function of the queues; and fractional scores mean a strict
    # priority under the priority rule but a random split under the proportional one.
    network = Network.from_instance(ROUTED)
    result = event_long_run(network, make_policy("maxweight", network), seed=4, copies=100, precision=0.01,
                            first_horizon=4000)
    assert abs(-result.lta_return - exact_cost(network, make_policy("maxweight", network, exact=True))) \
        <= 1.5 * result.half_width

    def scores(observations):
        return np.tile([0.3, 1.0, 0.6], (len(observations), 1)).astype(np.float32)

    for allocation in ("priority", "proportional"):
        ruled = Network.from_instance(ROUTED, allocation)
        result = event_long_run(ruled, scores, seed=5, copies=100, precision=0.01, first_horizon=4000)
        assert abs(-result.lta_return - exact_cost(ruled, scores)) <= 1.5 * result.half_width, allocation


def test_the_same_seed_gives_the_same_estimate_and_another_seed_another():
    network = Network.from_instance("reentrant-2")
    runs = [event_long_run(network, index=index_rule("lbfs", network), seed=seed, copies=8, precision=0.5, first_horizon=4000)
            for seed in (1, 1, 2)]
    assert runs[0].lta_return == runs[1].lta_return != runs[2].lta_return


@pytest.mark.parametrize("instance, name", [(ROUTED, "cmu"), (ROUTED, "maxweight"), (ROUTED, "lbfs"),
                                            ("criss-cross-il", "cmu")])  # the last: mu1 = mu3, a tie shares the server
def test_compiled_index_rules_cost_the_exact_value_of_the_classical_rule(instance, name):
    network = Network.from_instance(instance)
    value = exact_cost(network, make_policy(name, network, exact=True))
    result = event_long_run(network, index=index_rule(name, network), seed=6, copies=200, precision=0.005,
                            first_horizon=4000)
    assert abs(-result.lta_return - value) <= 1.5 * result.half_width, (name, result, value)


def test_bad_input_is_refused():
    with pytest.raises(ValueError, match="discrete-time network"):  # (connectivity exists in discrete time only)
        event_long_run("single-server-2class", order=[0, 1])
    with pytest.raises(ValueError, match="exactly one of policy, order or index"):
        event_long_run(ROUTED)
    with pytest.raises(ValueError, match="must list each of the buffers 0..2 once"):
        event_long_run(ROUTED, order=[0, 0, 1])


def test_cli_prints_the_cost_and_refuses_bad_input_in_one_line():
    run = [sys.executable, "-m", "queueing.eventsim"]
    result = subprocess.run([*run, "--instance", "criss-cross-il", "--policy", "lbfs", "--copies", "50",
                             "--precision", "0.05"], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert "instance criss-cross-il, policy lbfs: LTA return -0.6" in result.stdout
    result = subprocess.run([*run, "--instance", "single-server-2class", "--policy", "lbfs"], cwd=REPO,
                            capture_output=True, text=True, timeout=120)
    lines = result.stderr.strip().splitlines()
    assert result.returncode == 2 and len(lines) == 1 and "Traceback" not in result.stderr
    assert lines[0].startswith("python -m queueing.eventsim: error: single-server-2class is a discrete-time network")
    result = subprocess.run([*run, "--instance", "reentrant-2", "--policy", "cmu", "--copies", "8", "--from-empty",
                             "100", "1000"], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0 and result.stdout.splitlines()[1].startswith("slots       100-    1,000: cost ")
    result = subprocess.run([*run, "--instance", "reentrant-2", "--policy", "longest", "--from-empty", "100"],
                            cwd=REPO, capture_output=True, text=True, timeout=120)
    assert result.returncode == 2 and result.stderr.strip() == ("python -m queueing.eventsim: error: --from-empty "
                                                               "takes an index rule: --policy cmu, maxweight, lbfs or fbfs")


def test_cost_from_empty_reads_low_at_first_and_settles_at_the_exact_value():
    from queueing.eventsim import cost_from_empty

    network = Network.from_instance(ROUTED)
    order = [0, 2, 1]
    value = exact_cost(network, priority_policy(network, order))
    rank = np.empty(3)
    rank[order] = np.arange(3)
    windows = cost_from_empty(network, (np.zeros(3), -rank), [20, 20_000, 200_000], seed=2, copies=200)
    assert [window[:2] for window in windows] == [(0, 20), (20, 20_000), (20_000, 200_000)]
    first, _, settled = windows
    assert first[2] + first[3] < value  # an empty network costs less than its stationary average
    assert abs(settled[2] - value) <= 1.5 * settled[3], (settled, value)
    with pytest.raises(ValueError, match="increasing positive window edges"):
        cost_from_empty(network, (np.zeros(3), -rank), [100, 50])
