"""Tests of the built-in queueing networks (queueing/), their baselines and the baselines CLI."""

import json
import subprocess
import sys
from pathlib import Path

import gymnasium as gym
import numpy as np
import pytest
from gymnasium.utils.env_checker import check_env

import queueing  # noqa: F401  (registers QueueNetwork-v0)
from queueing.baselines import POLICIES, make_policy
from queueing.longrun import long_run
from queueing.env import (
    Network,
    QueueNetworkEnv,
    load_instance,
    server_allocation,
    step_dynamics,
)

REPO_ROOT = Path(__file__).resolve().parents[1]
SHIPPED = ["single-server-2class", "criss-cross", "connectivity-4buffer"]


def make_instance(**overrides) -> dict:
    """A two-buffer, one-server instance with deterministic defaults, for hand-worked cases."""
    instance = {
        "name": "hand-worked",
        "arrival_rates": [0.0, 0.0],
        "service_rates": [1.0, 1.0],
        "holding_costs": [1.0, 1.0],
        "servers": [[0, 1]],
    }
    instance.update(overrides)
    return instance


def run(env, initial_queues, actions, seed=0):
    """Queue lengths after reset and after each action."""
    obs, _ = env.reset(seed=seed, options={"initial_queues": initial_queues})
    history = [obs[: env.network.num_buffers].copy()]
    for action in actions:
        obs, *_ = env.step(np.asarray(action, dtype=np.float32))
        history.append(obs[: env.network.num_buffers].copy())
    return np.array(history)


# --- dynamics on hand-worked cases -------------------------------------------------------


def test_arrivals_with_rate_one_and_no_service_grow_queues_by_one_per_step():
    env = QueueNetworkEnv(make_instance(arrival_rates=[1.0, 1.0], service_rates=[0.0, 0.0]))
    history = run(env, [0, 3], [[1.0, 1.0]] * 5)
    np.testing.assert_array_equal(history[:, 0], np.arange(6))
    np.testing.assert_array_equal(history[:, 1], 3 + np.arange(6))


def test_a_server_completes_at_most_one_job_per_step():
    env = QueueNetworkEnv(make_instance())
    history = run(env, [4, 3], [[0.5, 0.5]] * 9)
    np.testing.assert_array_equal(history.sum(axis=1), [7, 6, 5, 4, 3, 2, 1, 0, 0, 0])


def test_each_server_serves_its_own_buffer_every_step():
    env = QueueNetworkEnv(make_instance(servers=[[0], [1]]))
    history = run(env, [3, 2], [[1.0, 1.0]] * 4)
    np.testing.assert_array_equal(history, [[3, 2], [2, 1], [1, 0], [0, 0], [0, 0]])


def test_priority_weights_serve_the_weighted_buffer():
    env = QueueNetworkEnv(make_instance())
    history = run(env, [2, 2], [[0.0, 1.0]] * 3)
    np.testing.assert_array_equal(history, [[2, 2], [2, 1], [2, 0], [1, 0]])


def test_routing_moves_a_completed_job_to_the_next_buffer():
    env = QueueNetworkEnv(
        make_instance(service_rates=[1.0, 0.0], servers=[[0], [1]], routing=[[0.0, 1.0], [0.0, 0.0]])
    )
    history = run(env, [3, 0], [[1.0, 1.0]] * 4)
    np.testing.assert_array_equal(history, [[3, 0], [2, 1], [1, 2], [0, 3], [0, 3]])


def test_service_uses_the_queues_at_the_start_of_the_step():
    # A job arriving in a slot cannot be served in that slot, even with mu = 1.
    env = QueueNetworkEnv(make_instance(arrival_rates=[1.0, 0.0], service_rates=[1.0, 1.0]))
    history = run(env, [0, 0], [[1.0, 0.0]] * 3)
    np.testing.assert_array_equal(history[:, 0], [0, 1, 1, 1])


def test_routed_job_is_not_served_downstream_in_the_same_step():
    env = QueueNetworkEnv(
        make_instance(service_rates=[1.0, 1.0], servers=[[0], [1]], routing=[[0.0, 1.0], [0.0, 0.0]])
    )
    history = run(env, [1, 0], [[1.0, 1.0]] * 2)
    np.testing.assert_array_equal(history, [[1, 0], [0, 1], [0, 0]])


def test_disconnected_buffer_is_never_served_and_bits_are_observed():
    env = QueueNetworkEnv(make_instance(connectivity=[0.0, 1.0]))
    obs, _ = env.reset(seed=0, options={"initial_queues": [3, 0]})
    for _ in range(10):
        np.testing.assert_array_equal(obs, [3, 0, 0, 1])
        obs, *_ = env.step(np.array([1.0, 0.0], dtype=np.float32))


def test_service_follows_the_observed_connectivity_bits():
    env = QueueNetworkEnv(make_instance(connectivity=[0.5, 0.5]))
    obs, _ = env.reset(seed=1, options={"initial_queues": [200, 0]})
    seen_bits = set()
    for _ in range(100):
        queue_before, connected_before = obs[0], obs[2]
        obs, *_ = env.step(np.array([1.0, 0.0], dtype=np.float32))
        # mu = 1 and no arrivals: buffer 0 loses a job exactly when it was connected.
        assert queue_before - obs[0] == connected_before
        seen_bits.add(tuple(obs[2:]))
    assert seen_bits == {(0.0, 0.0), (0.0, 1.0), (1.0, 0.0), (1.0, 1.0)}


def test_reward_is_minus_holding_cost_after_the_step():
    env = QueueNetworkEnv(make_instance(arrival_rates=[1.0, 0.0], holding_costs=[2.0, 5.0]))
    env.reset(seed=0, options={"initial_queues": [0, 3]})
    obs, reward, terminated, truncated, _ = env.step(np.array([0.0, 1.0], dtype=np.float32))
    np.testing.assert_array_equal(obs, [1, 2])
    assert reward == -(2.0 * 1 + 5.0 * 2)
    assert not terminated and not truncated


def test_actions_outside_the_box_and_nan_are_accepted():
    env = QueueNetworkEnv(make_instance())
    history = run(env, [2, 2], [[np.nan, 7.0], [-3.0, np.inf]])
    np.testing.assert_array_equal(history, [[2, 2], [2, 1], [2, 0]])


# --- allocation rule ------------------------------------------------------------------------

ONE_SERVER = np.array([[1, 1, 1, 1]])


def test_allocation_is_proportional_to_weights():
    probabilities = server_allocation([0.2, 0.6, 0.2, 0.0], [1, 1, 1, 1], [1, 1, 1, 1], ONE_SERVER)
    np.testing.assert_allclose(probabilities, [0.2, 0.6, 0.2, 0.0])


def test_allocation_ignores_empty_and_disconnected_buffers():
    probabilities = server_allocation([1.0, 0.5, 0.25, 0.25], [0, 4, 4, 4], [1, 1, 0, 1], ONE_SERVER)
    np.testing.assert_allclose(probabilities, [0.0, 2 / 3, 0.0, 1 / 3])


def test_allocation_is_uniform_over_eligible_buffers_when_their_weights_are_zero():
    probabilities = server_allocation([0.0, 0.0, 0.0, 0.9], [3, 3, 3, 0], [1, 0, 1, 1], ONE_SERVER)
    np.testing.assert_allclose(probabilities, [0.5, 0.0, 0.5, 0.0])


def test_allocation_treats_nan_as_zero_and_clips():
    probabilities = server_allocation([np.nan, 3.0, 0.5, -1.0], [1, 1, 1, 1], [1, 1, 1, 1], ONE_SERVER)
    np.testing.assert_allclose(probabilities, [0.0, 2 / 3, 1 / 3, 0.0])


def test_allocation_is_per_server_and_idle_servers_get_nothing():
    two_servers = np.array([[1, 1, 0, 0], [0, 0, 1, 1]])
    probabilities = server_allocation([0.3, 0.1, 0.7, 0.2], [2, 2, 0, 0], [1, 1, 1, 1], two_servers)
    np.testing.assert_allclose(probabilities, [0.75, 0.25, 0.0, 0.0])


def test_priority_allocation_serves_the_largest_eligible_weight_and_splits_ties():
    two_servers = np.array([[1, 1, 0, 0], [0, 0, 1, 1]])
    # Server 0: buffer 0 has the larger weight but is empty, so buffer 1 wins; server 1: a tie.
    probabilities = server_allocation([0.9, 0.2, 0.4, 0.4], [0, 2, 1, 1], [1, 1, 1, 1], two_servers, "priority")
    np.testing.assert_allclose(probabilities, [0.0, 1.0, 0.5, 0.5])
    probabilities = server_allocation([np.nan, 3.0, 0.5, -1.0], [1, 1, 1, 1], [1, 1, 1, 1], ONE_SERVER, "priority")
    np.testing.assert_allclose(probabilities, [0.0, 1.0, 0.0, 0.0])  # scores are not clipped; NaN is lowest
    probabilities = server_allocation([5.0, 2.0, 7.0, 3.0], [1, 1, 1, 1], [1, 1, 1, 1], ONE_SERVER, "priority")
    np.testing.assert_allclose(probabilities, [0.0, 0.0, 1.0, 0.0])
    probabilities = server_allocation([0.0, 0.0, 0.0, 0.9], [3, 3, 3, 0], [1, 0, 1, 1], ONE_SERVER, "priority")
    np.testing.assert_allclose(probabilities, [0.5, 0.0, 0.5, 0.0])


def test_priority_allocation_makes_the_env_follow_the_largest_weight():
    network = Network.from_instance(make_instance(service_rates=[1.0, 1.0, 1.0], arrival_rates=[0, 0, 0],
                                                  holding_costs=[1, 1, 1], servers=[[0, 1, 2]]), "priority")
    copies = 2000
    weights = np.tile([0.1, 0.3, 0.6], (copies, 1))
    uniforms = np.random.default_rng(0).random((copies, network.draws_per_slot))
    _, _, completed = step_dynamics(network, np.full((copies, 3), 5), np.ones((copies, 3), bool), weights, uniforms)
    assert completed[:, 2].all() and not completed[:, :2].any()
    with pytest.raises(ValueError, match="allocation must be one of proportional, priority"):
        Network.from_instance("criss-cross", "argmax")


def test_sampled_service_frequencies_match_the_allocation():
    network = Network.from_instance(make_instance(service_rates=[1.0, 1.0, 1.0], arrival_rates=[0, 0, 0],
                                                  holding_costs=[1, 1, 1], servers=[[0, 1, 2]]))
    copies = 40000
    queues = np.full((copies, 3), 5)
    weights = np.tile([0.1, 0.3, 0.6], (copies, 1))
    uniforms = np.random.default_rng(0).random((copies, network.draws_per_slot))
    _, _, completed = step_dynamics(network, queues, np.ones((copies, 3), bool), weights, uniforms)
    np.testing.assert_array_equal(completed.sum(axis=1), 1)
    np.testing.assert_allclose(completed.mean(axis=0), [0.1, 0.3, 0.6], atol=0.01)


# --- seeding and consistency with the batched simulation ----------------------------------


def trajectory(env, seed, steps=200):
    obs, _ = env.reset(seed=seed)
    observations, rewards = [obs], []
    for step in range(steps):
        action = np.array([(step % 3) / 2, 0.5, 1 - (step % 3) / 2, 0.3], dtype=np.float32)
        obs, reward, *_ = env.step(action)
        observations.append(obs)
        rewards.append(reward)
    return np.array(observations), np.array(rewards)


def test_same_seed_gives_identical_trajectories_and_different_seeds_differ():
    env = QueueNetworkEnv("connectivity-4buffer")
    first_obs, first_rewards = trajectory(env, seed=7)
    second_obs, second_rewards = trajectory(QueueNetworkEnv("connectivity-4buffer"), seed=7)
    np.testing.assert_array_equal(first_obs, second_obs)
    np.testing.assert_array_equal(first_rewards, second_rewards)
    other_obs, _ = trajectory(env, seed=8)
    assert not np.array_equal(first_obs, other_obs)


def test_one_slot_of_a_continuous_time_line_has_the_uniformized_transition_probabilities():
    # reentrant-2 under LBFS from one job everywhere: servers pick buffers 2 and 5; in a slot either an arrival at
    # buffer 0 or 2 (rate 9/140 each), a completion at 2 (rate 1/4, the job goes to 5) or at 5 (rate 1, it leaves),
    # or nothing.
    network = Network.from_instance("reentrant-2")
    rate = 2 * 9 / 140 + 1 / 2 + 1.0  # uniformization: arrivals + the fastest rate of each station
    expected = {(1, 0, 0, 0, 0, 0): 9 / 140 / rate, (0, 0, 1, 0, 0, 0): 9 / 140 / rate,
                (0, 0, -1, 0, 0, 1): 1 / 4 / rate, (0, 0, 0, 0, 0, -1): 1.0 / rate}
    expected[(0,) * 6] = 1 - sum(expected.values())
    copies = 400_000
    queues = np.ones((copies, 6), dtype=np.int64)
    weights = np.tile([0, 0, 1, 0, 0, 1], (copies, 1)).astype(np.float32)
    uniforms = np.random.default_rng(7).random((copies, network.draws_per_slot))
    new_queues, _, _ = step_dynamics(network, queues, np.ones_like(queues, dtype=bool), weights, uniforms)
    changes, counts = np.unique(new_queues - queues, axis=0, return_counts=True)
    observed = {tuple(change): count / copies for change, count in zip(changes, counts)}
    assert set(observed) == set(expected)
    for change, probability in expected.items():
        assert abs(observed[change] - probability) < 4 * np.sqrt(probability * (1 - probability) / copies), change
    # Served buffers 0 and 4 instead: a completion at 0 moves the job to 3, at 4 it leaves.
    weights = np.tile([1, 0, 0, 0, 1, 0], (copies, 1)).astype(np.float32)
    new_queues, _, _ = step_dynamics(network, queues, np.ones_like(queues, dtype=bool), weights, uniforms)
    changes, counts = np.unique(new_queues - queues, axis=0, return_counts=True)
    observed = {tuple(change): count / copies for change, count in zip(changes, counts)}
    for change, probability in {(-1, 0, 0, 1, 0, 0): 1 / 8 / rate, (0, 0, 0, 0, -1, 0): 1 / 7 / rate}.items():
        assert abs(observed[change] - probability) < 4 * np.sqrt(probability * (1 - probability) / copies), change


def test_reset_validates_initial_queues():
    env = QueueNetworkEnv("single-server-2class")
    with pytest.raises(ValueError, match="initial_queues"):
        env.reset(options={"initial_queues": [1, -1]})
    with pytest.raises(ValueError, match="initial_queues"):
        env.reset(options={"initial_queues": [1, 2, 3]})


# --- instance files -------------------------------------------------------------------------


@pytest.mark.parametrize(
    "overrides, removed, field",
    [
        ({}, "service_rates", "service_rates"),
        ({"max_episode_steps": 10}, None, "max_episode_steps"),
        ({"service_rates": [0.5]}, None, "service_rates"),
        ({"holding_costs": [1.0, 1.0, 1.0]}, None, "holding_costs"),
        ({"arrival_rates": [0.5, 1.5]}, None, "arrival_rates"),
        ({"service_rates": [-0.1, 0.5]}, None, "service_rates"),
        ({"connectivity": [0.5, 2.0]}, None, "connectivity"),
        ({"holding_costs": [1.0, -1.0]}, None, "holding_costs"),
        ({"arrival_rates": [0.1, True]}, None, "arrival_rates"),
        ({"servers": [[0]]}, None, "servers"),  # buffer 1 served by no server
        ({"servers": [[0, 1], [1]]}, None, "servers"),  # buffer 1 served by two servers
        ({"servers": [[0, 1, 2]]}, None, "servers"),  # unknown buffer
        ({"routing": [[0.0, 1.0, 0.0], [0.0, 0.0, 0.0]]}, None, "routing"),  # routes to a 3rd buffer
        ({"routing": [[0.0, 1.0]]}, None, "routing"),
        ({"routing": [[0.6, 0.6], [0.0, 0.0]]}, None, "routing"),  # row sum > 1
        ({"routing": [[0.0, -0.2], [0.0, 0.0]]}, None, "routing"),
        ({"name": 3}, None, "name"),
    ],
)
def test_bad_instance_raises_value_error_naming_the_field(overrides, removed, field):
    instance = make_instance(**overrides)
    if removed:
        del instance[removed]
    with pytest.raises(ValueError, match=f'"{field}"') as error:
        load_instance(instance)
    assert "\n" not in str(error.value)


def test_bad_instance_file_names_the_file_and_the_field(tmp_path):
    path = tmp_path / "foo.json"
    path.write_text(json.dumps(make_instance(service_rates=[0.5, 0.5, 0.5])))
    with pytest.raises(ValueError) as error:
        load_instance(str(path))
    assert str(error.value) == (
        f"instance '{path}': field \"service_rates\" must have 2 entries (one per buffer), got 3"
    )


def test_user_instance_file_loads(tmp_path):
    path = tmp_path / "mine.json"
    path.write_text(json.dumps(make_instance(arrival_rates=[0.1, 0.2])))
    assert load_instance(str(path))["arrival_rates"] == [0.1, 0.2]
    assert QueueNetworkEnv(str(path)).observation_space.shape == (2,)


def test_unknown_instance_name_lists_the_available_ones():
    with pytest.raises(ValueError, match="unknown instance 'nope'") as error:
        load_instance("nope")
    for name in SHIPPED:
        assert name in str(error.value)


def test_invalid_json_file_is_a_value_error(tmp_path):
    path = tmp_path / "broken.json"
    path.write_text("{")
    with pytest.raises(ValueError, match="not valid JSON"):
        load_instance(str(path))


@pytest.mark.parametrize("name", SHIPPED)
@pytest.mark.filterwarnings("ignore:.*maximum value is infinity")  # queues are unbounded by design
def test_shipped_instances_work_through_gym_make(name):
    assert name in queueing.available_instances()
    env = gym.make("queueing:QueueNetwork-v0", instance=name)
    assert env.spec.max_episode_steps == 1000
    check_env(env.unwrapped, skip_render_check=True)
    env.reset(seed=0)
    for step in range(1, 1001):
        _, _, terminated, truncated, _ = env.step(env.action_space.sample())
        assert not terminated
        assert truncated == (step == 1000)


# --- baselines ------------------------------------------------------------------------------


def exact_cmu_lta_single_server_2class() -> float:
    """Stationary mean holding cost of strict priority to buffer 0, by power iteration of the chain."""
    spec = load_instance("single-server-2class")
    (arrival_0, arrival_1), (service_0, service_1) = spec["arrival_rates"], spec["service_rates"]
    probability = np.zeros((30, 120))  # truncated (q0, q1) grid; the mass near its edges is < 1e-19
    probability[0, 0] = 1.0
    for _ in range(4000):
        after_service = probability.copy()
        served_0 = probability[1:, :] * service_0
        after_service[1:, :] -= served_0
        after_service[:-1, :] += served_0
        served_1 = probability[0, 1:] * service_1  # buffer 1 is served only when buffer 0 is empty
        after_service[0, 1:] -= served_1
        after_service[0, :-1] += served_1
        after_arrival_0 = after_service * (1 - arrival_0)
        after_arrival_0[1:, :] += after_service[:-1, :] * arrival_0
        probability = after_arrival_0 * (1 - arrival_1)
        probability[:, 1:] += after_arrival_0[:, :-1] * arrival_1
    total_queue = np.arange(30)[:, None] + np.arange(120)[None, :]
    return -float((probability * total_queue).sum())


def simulate(name, seed, precision=0.02):
    network = Network.from_instance("single-server-2class")
    result = long_run(network, make_policy(name, network, np.random.default_rng(seed)), seed=seed, copies=100,
                      precision=precision, first_horizon=2000)
    return result.lta_return, result.half_width


def test_simulated_intervals_cover_the_exact_cmu_value():
    exact = exact_cmu_lta_single_server_2class()
    assert exact == pytest.approx(-2.68333, abs=1e-4)
    # Twenty independent estimates at 5% precision: a 95% interval misses about one in twenty; 16 or fewer
    # covering would happen with probability < 2% if the level held.
    covered = 0
    for seed in range(20):
        value, half_width = simulate("cmu", seed=100 * seed, precision=0.05)
        assert 0 < half_width <= 0.05 * abs(value)
        covered += abs(value - exact) <= half_width
    assert covered >= 17


def test_cmu_beats_random_on_single_server_2class():
    cmu, cmu_half_width = simulate("cmu", seed=3)
    random, random_half_width = simulate("random", seed=4)
    # The two runs are independent, so the CI of the difference has half-width hypot(...).
    assert cmu - random > np.hypot(cmu_half_width, random_half_width)


def test_policies_map_observations_to_weights():
    network = Network.from_instance("connectivity-4buffer")
    observations = np.array(
        [
            [3, 0, 2, 5, 1, 1, 1, 0],  # buffer 3 longest but disconnected
            [1, 1, 4, 4, 1, 1, 1, 1],
            [0, 0, 0, 0, 1, 1, 1, 1],
        ],
        dtype=np.float32,
    )
    cmu = POLICIES["cmu"](network)(observations)
    longest = POLICIES["longest"](network)(observations)
    maxweight = POLICIES["maxweight"](network)(observations)
    # c*mu = (0.9, 0.9, 1.8, 1.8): priority to buffers 2 and 3, ties shared.
    np.testing.assert_array_equal(cmu, [[0, 0, 1, 0], [0, 0, 1, 1], [0, 0, 0, 0]])
    np.testing.assert_array_equal(longest, [[1, 0, 0, 0], [0, 0, 1, 1], [0, 0, 0, 0]])
    np.testing.assert_array_equal(maxweight, [[0, 0, 1, 0], [0, 0, 1, 1], [0, 0, 0, 0]])
    random = POLICIES["random"](network, np.random.default_rng(0))(observations)
    assert random.shape == (3, 4) and np.all((random >= 0) & (random <= 1))


def run_cli(*arguments):
    return subprocess.run(
        [sys.executable, "-m", "queueing.baselines", *arguments],
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        timeout=60,
    )


def test_cli_prints_a_steady_state_value_whose_interval_covers_the_exact_one():
    result = run_cli("--instance", "single-server-2class", "--policy", "cmu", "--precision", "0.05", "--copies", "50")
    assert result.returncode == 0, result.stderr
    value = float(result.stdout.split("LTA return ")[1].split()[0])
    half_width = float(result.stdout.split("+- ")[1].split()[0])
    assert 0 < half_width <= 0.05 * abs(value)
    assert abs(value - exact_cmu_lta_single_server_2class()) <= 1.5 * half_width
    assert "first half of each discarded" in result.stdout


@pytest.mark.parametrize(
    "arguments, message",
    [
        (["--instance", "nope", "--policy", "cmu"], "unknown instance 'nope'"),
        (["--policy", "best"], "unknown policy 'best'"),
        (["--policy", "cmu", "--copies", "1"], "--copies"),
        (["--policy", "cmu", "--precision", "2"], "--precision"),
        (["--instance", "criss-cross"], "exactly one of --policy"),
    ],
)
def test_cli_rejects_bad_arguments_with_one_line(arguments, message):
    result = run_cli(*arguments)
    assert result.returncode == 2
    assert result.stdout == ""
    assert len(result.stderr.strip().splitlines()) == 1
    assert message in result.stderr and "Traceback" not in result.stderr
