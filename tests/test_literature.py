"""The literature's networks (queueing/families.py), the exact solver against published optima, the long-run
estimator against exact values, and the best static priority search."""

import itertools
import json

import numpy as np
import pytest

from queueing import exact
from queueing.baselines import best_static_priority, make_policy, priority_policy
from queueing.env import INSTANCES_DIR, Network, load_instance
from queueing.families import criss_cross, instance_json, literature_instances, reentrant
from queueing.longrun import long_run


def station_loads(instance: dict) -> np.ndarray:
    """Each server's load from the traffic equations lambda = a + R^T lambda, written out independently."""
    arrivals = np.array(instance["arrival_rates"])
    routing = np.array(instance["routing"])
    throughput = np.linalg.solve(np.eye(len(arrivals)) - routing.T, arrivals)
    work = throughput / np.array(instance["service_rates"])
    return np.array([work[buffers].sum() for buffers in instance["servers"]])


@pytest.mark.parametrize("instance", literature_instances(), ids=lambda instance: instance["name"])
def test_shipped_file_is_the_family_definition(instance):
    path = INSTANCES_DIR / f"{instance['name']}.json"
    assert path.read_text() == instance_json(instance)
    assert load_instance(instance["name"])["routing"] == instance["routing"]


@pytest.mark.parametrize("stations", range(2, 8))
def test_reentrant_line_routes_and_loads(stations):
    instance = load_instance(f"reentrant-{stations}")
    classes = 3 * stations
    routing = np.array(instance["routing"])
    # Class i (from 1) goes to i + 3 up to 3L - 3; class 3L - 2 to class 2; the last two leave.
    expected = np.zeros((classes, classes))
    for i in range(1, classes - 2):
        expected[i - 1, i + 2] = 1.0
    expected[classes - 3, 1] = 1.0
    np.testing.assert_array_equal(routing, expected)
    assert instance["arrival_rates"][0] == instance["arrival_rates"][2] == pytest.approx(9 / 140)
    assert sum(instance["arrival_rates"]) == pytest.approx(2 * 9 / 140)
    np.testing.assert_allclose(station_loads(instance), 0.9, rtol=1e-12)
    # Stream 1 visits every station twice, stream 2 once: 3 classes per station.
    assert instance["servers"] == [[3 * s, 3 * s + 1, 3 * s + 2] for s in range(stations)]


@pytest.mark.parametrize("regime, loads", [("il", (0.3, 0.2)), ("bl", (0.3, 0.3)), ("im", (0.6, 0.4)),
                                           ("bm", (0.6, 0.6)), ("ih", (0.9, 0.6)), ("bh", (0.9, 0.9))])
def test_criss_cross_regime_loads(regime, loads):
    np.testing.assert_allclose(station_loads(load_instance(f"criss-cross-{regime}")), loads, rtol=1e-12)


def test_family_definitions_refuse_what_they_do_not_define():
    with pytest.raises(ValueError, match="regime"):
        criss_cross("hh")
    with pytest.raises(ValueError, match="at least 2 stations"):
        reentrant(1)


# Dai & Gluzman's dynamic-programming optima of the light and moderate regimes.
PUBLISHED_OPTIMA = {"il": 0.671, "bl": 0.843, "im": 2.084, "bm": 2.829}


@pytest.mark.parametrize("regime", sorted(PUBLISHED_OPTIMA))
def test_exact_optimum_matches_the_published_dynamic_programming_value(regime):
    network = Network.from_instance(f"criss-cross-{regime}")
    result = exact.solve_until_converged(network, 30, tolerance=0.0005)
    assert result.relative_change < 0.0005
    assert -result.fine.lta_return == pytest.approx(PUBLISHED_OPTIMA[regime], rel=0.001)


def test_gap_is_measured_on_the_same_chain_and_never_negative():
    network = Network.from_instance("criss-cross-bl")
    # The optimum's own decisions, written as a policy: its gap is zero on every level, never below.
    for name in ("cmu", "lbfs", "fbfs", "maxweight"):
        gap = exact.gap_until_converged(network, 20, make_policy(name, network, exact=True), tolerance=0.001)
        for optimum, policy in gap.levels:
            assert optimum.level == policy.level
            assert policy.lta_return <= optimum.lta_return + 1e-5 * abs(optimum.lta_return)
        assert gap.gap >= -1e-5
    assert gap.gap > 0.01  # maxweight is not optimal here


def test_optimum_is_cached_per_model_and_level(exact_cache):
    network = Network.from_instance("criss-cross-il")
    first, warm_start = exact.cached_optimum(network, 17)
    assert warm_start is not None  # computed
    again, warm_start = exact.cached_optimum(network, 17)
    assert warm_start is None and again == first  # read back
    renamed = Network.from_instance({**load_instance("criss-cross-il"), "name": "other-name"})
    assert exact.cached_optimum(renamed, 17)[1] is None  # the same model under another name
    faster = Network.from_instance({**load_instance("criss-cross-il"), "service_rates": [2.0, 2.0, 2.0]})
    assert exact.cached_optimum(faster, 17)[1] is not None  # another model
    stored = json.loads((exact_cache / "ppo_continuous" / "exact_optima.json").read_text())
    assert len(stored) >= 2


def test_long_run_estimate_covers_the_exact_value():
    network = Network.from_instance("criss-cross-bl")
    for name in ("maxweight",):
        value = exact.gap_until_converged(network, 30, make_policy(name, network, exact=True), 0.0005).policy.lta_return
        result = long_run(network, make_policy(name, network), seed=3, copies=64, precision=0.01, first_horizon=4000)
        assert result.relative_half_width <= 0.01
        assert abs(result.lta_return - value) <= result.half_width, (name, result, value)
        assert result.stationary


def test_long_run_flags_a_run_that_is_not_stationary():
    # Overloaded: the queue grows without bound, so the last quarter costs more than the third.
    network = Network.from_instance({"name": "overloaded", "time": "continuous", "arrival_rates": [1.2],
                                     "service_rates": [1.0], "holding_costs": [1.0], "servers": [[0]]})
    result = long_run(network, make_policy("cmu", network), copies=16, precision=0.5, first_horizon=4000)
    assert not result.stationary and result.drift < 0
    assert "WARNING: not stationary" in result.describe()


def test_static_priority_search_finds_the_exact_best_order():
    network = Network.from_instance("criss-cross-im")
    exact_costs = {}
    for first in itertools.permutations([0, 2]):
        order = [*first, 1]
        exact_costs[tuple(order)] = exact.gap_until_converged(
            network, 30, priority_policy(network, order), 0.001).policy.lta_return
    found, _ = best_static_priority(network, [[2, 0, 1]], copies=64, horizon=8000)  # starts at the worse order
    assert tuple(found) == max(exact_costs, key=exact_costs.get)


def test_long_run_keeps_the_networks_allocation_rule():
    # Scores that are not 0/1 mean a strict priority under the priority rule and a random choice under the
    # proportional one: the simulation must use the rule of the network it is given, as the exact solver does.
    network = Network.from_instance("single-server-2class", "priority")

    def scores(observations):
        return np.tile([0.2, 0.1], (len(observations), 1)).astype(np.float32)

    value = exact.gap_until_converged(network, 30, scores, 0.001).policy.lta_return
    result = long_run(network, scores, seed=5, copies=64, precision=0.01, first_horizon=4000)
    assert abs(result.lta_return - value) <= 1.5 * result.half_width
    proportional = exact.gap_until_converged(Network.from_instance("single-server-2class"), 30, scores, 0.001)
    assert abs(proportional.policy.lta_return - value) > 3 * result.half_width  # the two rules differ here


def test_the_report_takes_medians_over_seeds_and_rewrites_only_the_readme_tables(tmp_path, monkeypatch):
    import benchmarks.literature as literature

    store = {"optima": {"criss-cross-il": [[40, 1, 0.67062], [50, 2, 0.67063]]},
             "ppo": {"criss-cross-il": {str(seed): {"cost": cost, "gap": gap, "how": "exact", "best_step": 1,
                                                     "wall_seconds": 60, "settings": "s", "curve": []}
                                        for seed, cost, gap in [(1, 0.6707, 0.0001), (2, 0.6800, 0.014),
                                                                (3, 0.6715, 0.0013)]}}}
    long_run = {"half_width": 0.1, "how": "long-run"}
    store["ppo"]["reentrant-2"] = {str(seed): {**long_run, "cost": cost, "best_step": 6e6, "curve": [],
                                               "wall_seconds": 60, "settings": "s"}
                                   for seed, cost in [(1, 13.5), (2, 14.0)]}
    store["classical"] = {"reentrant-2": {name: {**long_run, "cost": cost} for name, cost in
                                          [("best_static", 14.0), ("cmu", 13.9), ("lbfs", 14.2), ("maxweight", 13.0)]}}
    store["classical"]["reentrant-2"]["best_static"]["order"] = [[0, 1, 2], [3, 4, 5]]
    readme = tmp_path / "README.md"
    readme.write_text(f"before\n{literature.README_MARKERS[0]}\nold table\n{literature.README_MARKERS[1]}\nafter\n")
    monkeypatch.setattr(literature, "README", readme)
    monkeypatch.setattr(literature, "RESULTS", tmp_path)
    literature.write_report(store)
    row = next(line for line in readme.read_text().splitlines() if line.startswith("| IL |"))
    assert "| 0.6715 (0.6707, 0.6800, 0.6715) | +0.13% |" in row and "| -0.06% |" in row
    row = next(line for line in readme.read_text().splitlines() if line.startswith("| 6 |"))
    # median 13.75 against the published 14.130 - 0.208, and against c-mu, the cheapest static priority
    # (MaxWeight is not one)
    assert "| 13.750 (13.50 ± 0.10 @ 6M, 14.00 ± 0.10 @ 6M), 1 of 3 seeds missing | yes (-0.17) | -1.1% (c-mu) |" in row
    text = readme.read_text()
    assert text.startswith("before\n") and text.endswith("after\n") and "old table" not in text
    assert row in (tmp_path / "literature.md").read_text() and (tmp_path / "literature.png").exists()


def test_a_finished_training_is_found_and_an_interrupted_one_is_not(tmp_path):
    from benchmarks.literature import finished_run

    best = tmp_path / "runs" / "some_run" / "best.pt"
    best.parent.mkdir(parents=True)
    best.write_bytes(b"")
    log = tmp_path / "train.log"
    log.write_text("step 16384/32768  SPS 20000\ninterrupted: step 16384/32768; evaluations took 3.0 s of 9.5 s\n")
    assert finished_run(tmp_path) is None
    log.write_text("step 16384/32768  SPS 20000\ndone: step 32768/32768; evaluations took 3.0 s of 19.5 s\n")
    assert finished_run(tmp_path) == (best, 19.5)


def test_missing_runs_come_first_seed_of_every_instance_first(tmp_path):
    from benchmarks.literature import missing_runs

    store = {"ppo": {"reentrant-2": {"1": {}}, "reentrant-6": {"2": {}}}}
    runs = missing_runs(["reentrant-2", "reentrant-6", "criss-cross-il"], store, tmp_path)
    assert runs == [("reentrant-6", 1), ("criss-cross-il", 1), ("reentrant-2", 2), ("criss-cross-il", 2),
                    ("reentrant-2", 3), ("criss-cross-il", 3)]
    assert missing_runs(["reentrant-2"], store, tmp_path, no_training=True) == []


def test_heavy_traffic_trains_on_long_episodes():
    from benchmarks.literature import recommended

    def option(instance, name):
        options = recommended(instance)
        return int(options[options.index(name) + 1])

    def reset_steps(instance):
        return option(instance, "--reset-steps")

    assert [reset_steps(f"criss-cross-{regime}") for regime in ("il", "bl", "im", "bm")] == [5000] * 4
    assert reset_steps("criss-cross-ih") == reset_steps("criss-cross-bh") == reset_steps("reentrant-4") == 100_000
    for classes, instance in zip((15, 18, 21), ("reentrant-5", "reentrant-6", "reentrant-7")):
        # no episode ends within the run, and the evaluation discards the transient (up to 100,000 slots on 21)
        steps_per_env = option(instance, "--total-timesteps") // option(instance, "--num-envs")
        assert reset_steps(instance) > steps_per_env, classes
        assert option(instance, "--eval-warmup") >= 100_000, classes
        assert recommended(instance).count("--reset-steps") == recommended(instance).count("--eval-warmup") == 1
    assert option("reentrant-4", "--eval-warmup") == 20_000
    assert recommended("criss-cross-bh").count("--reset-steps") == recommended("criss-cross-bh").count("--num-envs") == 1
    num_envs = {instance: option(instance, "--num-envs")
                for instance in ("criss-cross-il", "criss-cross-ih", "criss-cross-bh", "reentrant-2")}
    assert num_envs == {"criss-cross-il": 64, "criss-cross-ih": 32, "criss-cross-bh": 32, "reentrant-2": 64}
    assert "--ent-coef" not in recommended("criss-cross-il")
    assert recommended("criss-cross-ih")[-3:] == ["--ent-coef", "0.01", "--expected-td"]
    assert "--expected-td" not in recommended("criss-cross-bm")
    assert recommended("reentrant-7")[-3:] == ["--ent-coef", "0.01", "--expected-td"]
    assert recommended("reentrant-2")[-5:] == ["--ent-coef", "0.01", "--expected-td", "--actor-starts", "2000000"]
    # the actor waits until the 6-class line has settled from empty (about 20,000 slots per env)
    assert option("reentrant-2", "--actor-starts") // option("reentrant-2", "--num-envs") > 20_000
    assert all("--actor-starts" not in recommended(instance) for instance in ("reentrant-3", "reentrant-7"))


def test_warm_start_acts_as_the_static_priority_it_starts_from(tmp_path):
    import sys
    from pathlib import Path

    from benchmarks.literature import static_priority_scores, warm_start
    from queueing.longrun import checkpoint_policy

    server_order = [[2, 0, 1], [3, 5, 4]]  # neither LBFS nor FBFS
    assert static_priority_scores(server_order, 6) == [1.0, 0.0, 2.0, 2.0, 0.0, 1.0]
    command = [sys.executable, str(Path(__file__).parent.parent / "ppo_continuous.py"), "--env-id", "queueing:QueueNetwork-v0", "--env-kwargs",
               '{"instance": "reentrant-2", "allocation": "priority"}', "--num-envs", "4", "--num-steps", "64",
               "--eval-episodes", "2", "--eval-warmup", "0", "--eval-horizon", "100",
               "--num-steps", "128"]  # a later option overrides an earlier one, as --extra does the recommended ones
    store = {"classical": {"reentrant-2": {"best_static": {"order": server_order}}}}
    path = warm_start(command, "reentrant-2", 1, tmp_path, store)
    policy, network = checkpoint_policy(str(path))
    static = priority_policy(network, [buffer for order in server_order for buffer in order])
    learned, fixed = (long_run(network, rule, seed=3, copies=8, precision=10.0, first_horizon=4000)
                      for rule in (policy, static))
    assert learned.lta_return == fixed.lta_return
    other = long_run(network, priority_policy(network, [0, 1, 2, 3, 4, 5]), seed=3, copies=8, precision=10.0,
                     first_horizon=4000)
    assert other.lta_return != fixed.lta_return  # the comparison can tell two orders apart


def test_a_reused_run_must_have_been_trained_with_the_recommended_settings():
    import dataclasses

    from benchmarks.literature import settings_mismatch, trainer_options
    from ppo_continuous import cli_args

    options = trainer_options("criss-cross-bh", 7, [])
    saved = {name: list(value) if isinstance(value, tuple) else value
             for name, value in dataclasses.asdict(cli_args(options)).items()}
    assert settings_mismatch(saved, options) == []
    assert settings_mismatch({**saved, "expected_td": False, "num_envs": 64}, options) == ["expected_td", "num_envs"]
    assert settings_mismatch(saved, options + ["--gae-lambda", "0.99"]) == ["gae_lambda"]
    assert settings_mismatch(saved, trainer_options("criss-cross-bh", 8, [])) == ["seed"]
    assert settings_mismatch(saved, trainer_options("criss-cross-ih", 7, [])) == ["env_kwargs"]
    # a checkpoint older than an option trained with its default (off), not with the recommended value
    assert settings_mismatch({name: value for name, value in saved.items() if name != "expected_td"}, options) == [
        "expected_td"]
    assert settings_mismatch({**saved, "env_kwargs": saved["env_kwargs"].replace(", ", ",")}, options) == []


def test_a_run_being_trained_is_neither_deleted_nor_trained_twice(tmp_path):
    from filelock import FileLock

    from benchmarks.literature import train

    live = tmp_path / "reentrant-2" / "seed1"
    (live / "runs").mkdir(parents=True)
    with FileLock(str(live) + ".lock"), pytest.raises(RuntimeError, match="being trained by another process"):
        train("reentrant-2", 1, tmp_path, [], {})
    assert (live / "runs").is_dir()
    with pytest.raises(RuntimeError, match="--parts classical --instance reentrant-3` first"):
        train("reentrant-3", 1, tmp_path, [], {})  # nothing to warm-start from: refused before anything is made
    assert not (tmp_path / "reentrant-3" / "seed1").exists()


def test_one_failed_run_neither_hides_nor_holds_up_the_others():
    from concurrent.futures import ThreadPoolExecutor

    from benchmarks.literature import finished_jobs

    def run(seed):
        if seed == 1:
            raise RuntimeError("training reentrant-2 seed 1 failed")
        return {"cost": float(seed)}

    with ThreadPoolExecutor(2) as pool:
        results = dict(finished_jobs({pool.submit(run, seed): seed for seed in (1, 2, 3)}))
    assert results[2] == {"cost": 2.0} and results[3] == {"cost": 3.0}
    assert isinstance(results[1], RuntimeError)


def test_the_starvation_rule_departs_from_the_stored_static_priority_only_where_station_2_starves():
    from benchmarks.literature import load_store, static_priority_scores
    from benchmarks.reentrant_rule import (STATIC_SCORES, class_1_first_by_station_2, starvation_rule,
                                           static_policy)

    order = load_store()["classical"]["reentrant-2"]["best_static"]["order"]
    assert STATIC_SCORES.tolist() == static_priority_scores(order, 6)
    network = Network.from_instance("reentrant-2", "priority")
    # Class 1 and class 3 waiting at station 1, class 2 empty; station 2 holds 0..3 jobs.
    observations = np.array([[2, 0, 3, jobs, 0, 0] for jobs in range(4)], dtype=float)
    rule = starvation_rule(1)(observations)
    assert (rule[:2, 0] > rule[:2, 2]).all() and (rule[:2, 1] > rule[:2, 0]).all()
    np.testing.assert_array_equal(rule[2:], static_policy(observations[2:]))
    # The analysis reads the rule back from simulated states: always class 1 first up to k jobs, never above.
    shares = class_1_first_by_station_2(starvation_rule(1), network, seed=3, copies=8, warmup=200, slots=2_000)
    assert {level: share for level, (_, share) in shares.items()} == {
        level: float(level <= 1) for level in shares}
    assert len(shares) >= 4
