"""The exact solver (queueing/exact.py): hand-checkable chains, known optima, agreement with simulation."""

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from queueing.baselines import make_policy
from queueing.env import Network, load_instance, next_state_distribution
from queueing.longrun import long_run
from queueing.exact import (StateSpace, TransitionModel, policy_transition, slot_outcomes, solve_truncation,
                            solve_until_converged)

REPO_ROOT = Path(__file__).resolve().parents[1]


def one_queue(arrival, service, time="discrete"):
    return {"name": "one-queue", "time": time, "arrival_rates": [arrival], "service_rates": [service],
            "holding_costs": [1.0], "servers": [[0]]}


def geo_geo_1_mean_queue(arrival, service):
    """Stationary mean queue of the discrete-time single queue: service, then arrival, in each slot.

    A birth-death chain: from q >= 1 it goes up w.p. lambda (1 - mu) and down w.p. mu (1 - lambda);
    from 0 up w.p. lambda. So pi_1 = pi_0 a with a = lambda / (mu (1 - lambda)), and pi_{q+1} = r pi_q
    for q >= 1 with r = lambda (1 - mu) / (mu (1 - lambda)).
    """
    a = arrival / (service * (1 - arrival))
    r = arrival * (1 - service) / (service * (1 - arrival))
    pi_0 = 1 / (1 + a / (1 - r))
    return pi_0 * a / (1 - r) ** 2


def test_transition_rows_are_distributions_and_blocking_keeps_the_total_within_the_level():
    network = Network.from_instance("criss-cross")
    model = TransitionModel.build(network, 6)
    for configuration, rows, matrix in zip(model.configurations, model.rows, model.matrices):
        np.testing.assert_allclose(np.asarray(matrix.sum(axis=1)).ravel(), 1.0)
        served = [buffer for buffer in configuration if buffer >= 0]
        assert (model.space.queues[rows][:, served] > 0).all()
    assert model.space.queues.sum(axis=1).max() == 6
    # Buffer 1 of criss-cross gets no outside arrivals but is fed by routing, so it is kept.
    assert model.space.limits.tolist() == [6, 6, 6]
    assert model.space.size == 84  # states with at most 6 jobs in 3 buffers: C(9, 3)


def test_slot_outcomes_by_hand():
    network = Network.from_instance(one_queue(0.25, 0.5))
    assert slot_outcomes(network, [0]) == pytest.approx({
        ((-1,), (1,)): 0.5 * 0.25, ((-1,), (0,)): 0.5 * 0.75, ((0,), (1,)): 0.5 * 0.25, ((0,), (0,)): 0.5 * 0.75,
    })
    continuous = Network.from_instance(one_queue(1.0, 3.0, time="continuous"))
    assert slot_outcomes(continuous, [0]) == pytest.approx({((0,), (1,)): 0.25, ((-1,), (0,)): 0.75})
    # Idle server: only the arrival event, the rest of the slot is a self-loop.
    assert slot_outcomes(continuous, []) == pytest.approx({((0,), (1,)): 0.25, ((0,), (0,)): 0.75})


def test_single_discrete_time_queue_matches_its_closed_form():
    solution, _ = solve_truncation(Network.from_instance(one_queue(0.3, 0.5)), 80)
    assert solution.lta_return == pytest.approx(-geo_geo_1_mean_queue(0.3, 0.5), rel=1e-5)


def test_continuous_time_queue_is_the_mm1_queue():
    # M/M/1 with rho = 2/3: mean number in system rho / (1 - rho) = 2, per unit time and so per slot.
    solution, _ = solve_truncation(Network.from_instance(one_queue(2.0, 3.0, time="continuous")), 80)
    assert solution.lta_return == pytest.approx(-2.0, rel=1e-5)


def test_single_server_2class_optimum_is_the_cmu_value():
    network = Network.from_instance("single-server-2class")
    optimum = solve_until_converged(network, 30)
    assert optimum.fine.lta_return == pytest.approx(-2.68333, abs=2e-4)
    assert optimum.relative_change < 0.005
    # On one truncation the two agree to the solver's tolerance once blocking is negligible.
    optimum, _ = solve_truncation(network, 60)
    cmu, _ = solve_truncation(network, 60, make_policy("cmu", network, exact=True))
    assert cmu.lta_return == pytest.approx(optimum.lta_return, abs=1e-5)
    assert optimum.lta_return == pytest.approx(-2.68333, abs=2e-5)
    longest = solve_until_converged(network, 30, make_policy("longest", network, exact=True))
    assert longest.fine.lta_return < optimum.lta_return - 0.3


def test_priority_allocation_turns_constant_weights_into_a_strict_priority():
    def constant(observations):
        return np.tile([0.6, 0.4], (len(observations), 1))

    cmu, _ = solve_truncation(Network.from_instance("single-server-2class"), 60)
    priority, _ = solve_truncation(Network.from_instance("single-server-2class", "priority"), 60, constant)
    proportional, _ = solve_truncation(Network.from_instance("single-server-2class"), 60, constant)
    assert priority.lta_return == pytest.approx(cmu.lta_return, abs=1e-5)
    assert proportional.lta_return < cmu.lta_return - 0.05


# A split route: buffer 0 feeds buffer 1 with probability 0.3 and buffer 2 with 0.5; the rest leaves.
SPLIT_ROUTE = {"name": "split-route", "time": "continuous", "arrival_rates": [0.5, 0.0, 0.2],
               "service_rates": [1.0, 0.7, 0.9], "holding_costs": [1.0, 2.0, 1.5], "servers": [[0, 2], [1]],
               "routing": [[0.0, 0.3, 0.5], [0.0, 0.0, 0.0], [0.0, 0.0, 0.0]]}


@pytest.mark.parametrize("instance, allocation, level", [("criss-cross-bh", "priority", 12),
                                                        ("reentrant-2", "priority", 7),
                                                        ("criss-cross-bh", "proportional", 12),
                                                        (SPLIT_ROUTE, "priority", 12)])
def test_next_state_distribution_is_the_exact_solvers_transition_row(instance, allocation, level):
    """E[f(next state)] from `next_state_distribution` equals the truncated chain's row times f, for a
    state-dependent policy, on every state whose successors all lie inside the truncation."""
    network = Network.from_instance(instance, allocation)
    mixing = np.random.default_rng(0).normal(size=(network.num_buffers, network.num_buffers))

    def policy(observations):
        scores = observations @ mixing
        return scores if allocation == "priority" else 1 / (1 + np.exp(-scores))

    model = TransitionModel.build(network, level)
    f = np.random.default_rng(1).normal(size=model.space.size)
    inside = np.flatnonzero(model.space.queues.sum(axis=1) < level)
    queues = model.space.queues[inside]
    next_queues, probabilities = next_state_distribution(network, queues, policy(queues.astype(float)))
    assert np.all(probabilities >= 0)
    np.testing.assert_allclose(probabilities.sum(axis=1), 1.0, atol=1e-12)
    want = policy_transition(model, policy)[inside] @ f
    np.testing.assert_allclose((probabilities * f[model.space.index(next_queues)]).sum(axis=1), want, atol=1e-12)


def test_next_state_distribution_refuses_discrete_time_networks():
    with pytest.raises(ValueError, match="continuous-time networks without connectivity only"):
        next_state_distribution(Network.from_instance("criss-cross"), np.zeros((1, 3), dtype=np.int64), np.zeros((1, 3)))


def test_fixed_policy_value_agrees_with_a_long_simulation():
    network = Network.from_instance("single-server-2class")
    exact = solve_until_converged(network, 30, make_policy("maxweight", network, exact=True)).fine.lta_return
    simulated, half_width = simulate(network, "maxweight", seed=4)
    assert abs(simulated - exact) <= 1.5 * half_width
    # "random" is solved as a uniform choice among the eligible buffers: the same law.
    exact_random = solve_until_converged(network, 30, make_policy("random", network, exact=True)).fine.lta_return
    simulated, half_width = simulate(network, "random", seed=5)
    assert abs(simulated - exact_random) <= 1.5 * half_width


def simulate(network, policy, seed):
    """The steady-state LTA return and its 95% CI half-width, simulated to 1% (queueing.longrun)."""
    act = make_policy(policy, network, np.random.default_rng(seed)) if isinstance(policy, str) else policy
    result = long_run(network, act, seed=seed, copies=100, precision=0.01, first_horizon=4000)
    assert result.relative_half_width <= 0.01
    return result.lta_return, result.half_width


TWO_SERVERS_CONNECTIVITY = {
    "name": "small-connectivity", "arrival_rates": [0.2, 0.15, 0.3], "service_rates": [0.7, 0.6, 0.8],
    "holding_costs": [1.0, 2.0, 1.0], "servers": [[0, 1], [2]], "routing": [[0, 0, 0.5], [0, 0, 0], [0, 0, 0]],
    "connectivity": [0.8, 0.6, 0.9],
}


def test_connectivity_and_routing_exact_values_agree_with_simulation_and_the_optimum_is_best():
    network = Network.from_instance(TWO_SERVERS_CONNECTIVITY)
    optimum, _ = solve_truncation(network, 30)
    values = {}
    for name in ("cmu", "longest"):
        values[name], _ = solve_truncation(network, 30, make_policy(name, network, exact=True))
        assert optimum.lta_return >= values[name].lta_return - 1e-6
    simulated, half_width = simulate(network, "longest", seed=1)
    assert abs(simulated - values["longest"].lta_return) <= 1.5 * half_width


def test_continuous_time_policy_value_agrees_with_simulation():
    instance = {"name": "ct-2class", "time": "continuous", "arrival_rates": [0.5, 0.4], "service_rates": [2.0, 1.0],
                "holding_costs": [1.0, 1.5], "servers": [[0, 1]]}
    network = Network.from_instance(instance)
    exact = solve_until_converged(network, 30, make_policy("longest", network, exact=True)).fine.lta_return
    simulated, half_width = simulate(network, "longest", seed=2)
    assert abs(simulated - exact) <= 1.5 * half_width


def test_state_space_index_round_trips():
    space = StateSpace.truncated(Network.from_instance("criss-cross"), 9)
    np.testing.assert_array_equal(space.index(space.queues), np.arange(space.size))


def run_exact(*arguments, timeout=120):
    return subprocess.run([sys.executable, "-m", "queueing.exact", *arguments], cwd=REPO_ROOT,
                          capture_output=True, text=True, timeout=timeout)


def test_cli_prints_value_gap_and_every_truncation_level():
    result = run_exact("--instance", "single-server-2class", "--policy", "longest", "--tolerance", "0.001")
    assert result.returncode == 0, result.stderr
    headline, *levels = result.stdout.strip().splitlines()
    value = float(headline.split("exact LTA return ")[1].split(",")[0])
    optimum = float(headline.split("optimum ")[1].split(",")[0])
    gap = float(headline.split("gap +")[1].split("%")[0]) / 100
    assert optimum == pytest.approx(-2.6833, abs=2e-4)
    assert gap == pytest.approx((optimum - value) / abs(optimum), abs=1e-4)
    assert "same truncated chain" in headline and "converged to 0.10%" in headline
    assert len(levels) >= 2 and all("truncation" in line and "gap" in line for line in levels)
    result = run_exact("--instance", "single-server-2class")
    assert result.returncode == 0 and "optimum: exact LTA return -2.683" in result.stdout


def test_cli_refuses_files_that_are_not_queueing_checkpoints(tmp_path):
    garbage = tmp_path / "garbage.pt"
    garbage.write_bytes(b"not a checkpoint at all")
    empty = tmp_path / "empty.pt"
    empty.write_bytes(b"")
    import torch

    torch.save({"args": {"env_id": "Pendulum-v1", "env_kwargs": "{}"}, "agent": {}}, tmp_path / "pendulum.pt")
    for path, message in ((garbage, "not a readable checkpoint"), (empty, "not a readable checkpoint"),
                          (tmp_path / "pendulum.pt", "trained on Pendulum-v1, not on a queueing instance")):
        result = run_exact("--checkpoint", str(path))
        assert result.returncode == 2, result.stderr
        assert len(result.stderr.strip().splitlines()) == 1 and "Traceback" not in result.stderr
        assert message in result.stderr


@pytest.mark.parametrize(
    "arguments, message",
    [
        (["--instance", "connectivity-4buffer"], "too large for the exact solver"),
        (["--instance", "nope"], "unknown instance 'nope'"),
        (["--policy", "best"], "unknown policy 'best'"),
        (["--policy", "priority:0,0"], "priority order"),
        (["--checkpoint", "missing.pt"], "missing.pt"),
    ],
)
def test_cli_errors_are_one_line(arguments, message):
    result = run_exact(*arguments)
    assert result.returncode == 2
    assert len(result.stderr.strip().splitlines()) == 1 and "Traceback" not in result.stderr
    assert message in result.stderr


@pytest.mark.parametrize("allocation", ["proportional", "priority"])
def test_checkpoint_exact_value_matches_a_simulation_of_its_policy(tmp_path, allocation):
    instance = {"name": "tiny-2class", "arrival_rates": [0.2, 0.2], "service_rates": [0.8, 0.5],
                "holding_costs": [1.0, 1.0], "servers": [[0, 1]]}
    instance_path = tmp_path / "tiny.json"
    instance_path.write_text(json.dumps(instance))
    extra_kwargs = {} if allocation == "proportional" else {"allocation": allocation}  # the default stays implicit
    train = subprocess.run(
        [sys.executable, str(REPO_ROOT / "ppo_continuous.py"), "--env-id", "queueing:QueueNetwork-v0",
         "--env-kwargs", json.dumps({"instance": str(instance_path), **extra_kwargs}), "--total-timesteps", "256",
         "--num-envs", "1", "--num-steps", "256", "--num-minibatches", "4", "--update-epochs", "1",
         "--eval-episodes", "None", "--checkpoint-dir", str(tmp_path / "registry")],
        cwd=tmp_path, capture_output=True, text=True, timeout=300,
        env={"PYTHONPATH": str(REPO_ROOT), "PATH": "/usr/bin:/bin"},
    )
    assert train.returncode == 0, train.stderr
    checkpoint = next(tmp_path.glob("runs/*/final.pt"))
    result = run_exact("--checkpoint", str(checkpoint), "--truncation", "25", timeout=300)
    assert result.returncode == 0, result.stderr
    exact = float(result.stdout.split("exact LTA return ")[1].split(",")[0])

    from queueing.exact import checkpoint_policy

    policy, trained_instance, trained_allocation = checkpoint_policy(str(checkpoint))
    assert load_instance(trained_instance) == load_instance(instance) and trained_allocation == allocation
    network = Network.from_instance(trained_instance, allocation)
    simulated, half_width = simulate(network, policy, seed=3)
    assert abs(simulated - exact) <= 1.5 * half_width

    # The same checkpoint made to act (0.6, 0.4) everywhere: strict priority to buffer 0 (the c-mu rule) under
    # the priority rule, a 60/40 random choice under the proportional one. The solver must read the rule.
    import torch

    saved = torch.load(checkpoint, weights_only=True)
    last_layer = max(key[: -len(".weight")] for key in saved["agent"] if key.startswith("actor_mean.")
                     and key.endswith(".weight"))
    saved["agent"][f"{last_layer}.weight"].zero_()
    saved["agent"][f"{last_layer}.bias"].copy_(torch.tensor([0.6, 0.4]))
    torch.save(saved, tmp_path / "constant.pt")
    result = run_exact("--checkpoint", str(tmp_path / "constant.pt"), "--truncation", "25", timeout=300)
    constant = float(result.stdout.split("exact LTA return ")[1].split(",")[0])
    cmu = solve_until_converged(network, 25, make_policy("cmu", network, exact=True)).fine.lta_return
    if allocation == "priority":
        assert constant == pytest.approx(cmu, abs=1e-4)
    else:
        assert constant < cmu - 0.01
