"""The evaluation protocol: how every candidate is scored, and how the scores reach checkpoints and the registry."""

import json

import numpy as np
import pytest
import scipy.stats
import torch

import ppo_continuous
import ppo_support
from checkpoint_saver import read_instance
from ppo_continuous import Agent, Args, cli_args, evaluate_checkpoints, train
from ppo_support import check_env, deterministic_numpy_policy, evaluate, evaluation_protocol
from queueing.baselines import POLICIES
from tests.conftest import fast_args, one_line_error, run_cli, run_dirs

CONSTANT = "tests.envs:ConstantReward-v0"
STEP_INDEX = "tests.envs:StepIndexReward-v0"


def zero_policy(obs):
    return np.zeros((len(obs), 1), np.float32)


def protocol(kind="episodic", episodes=3, horizon=10, warmup=0, seed=5):
    return {"kind": kind, "episodes": episodes, "horizon": horizon, "warmup": warmup, "seed": seed}


def test_a_constant_reward_scores_exactly_with_a_zero_width_interval():
    evaluation = evaluate(zero_policy, CONSTANT, {"reward": 0.5}, protocol(), native_vector=False)
    assert evaluation["mean"] == 0.5 and evaluation["half_width"] == 0.0 and evaluation["episodes"] == 3
    assert evaluation["protocol"] == protocol()


def test_an_episodic_copy_is_scored_until_its_episode_ends():
    # Rewards 1, 2, 3, 4 then termination: 2.5 per step, whatever follows the reset.
    evaluation = evaluate(zero_policy, STEP_INDEX, {"terminate_after": 4}, protocol(horizon=10), native_vector=False)
    assert evaluation["mean"] == 2.5 and evaluation["half_width"] == 0.0


def test_a_continuing_evaluation_discards_the_warmup():
    # Reward t at step t: steps 1-5 are the warm-up, steps 6-15 are scored, mean 10.5 (8 with the warm-up).
    evaluation = evaluate(zero_policy, STEP_INDEX, {}, protocol("continuing", episodes=2, horizon=10, warmup=5),
                          native_vector=False)
    assert evaluation["mean"] == 10.5 and evaluation["half_width"] == 0.0


def test_a_continuing_evaluation_refuses_an_env_that_terminates():
    with pytest.raises(ppo_continuous.TrainError, match="not a continuing task"):
        evaluate(zero_policy, STEP_INDEX, {"terminate_after": 4}, protocol("continuing", 2, 10, 5),
                 native_vector=False)


def default_protocol(env_id, env_kwargs=None, **options):
    args, kwargs = ppo_continuous.resolved_args(Args(env_id=env_id, env_kwargs=json.dumps(env_kwargs or {}),
                                                     **options))
    return evaluation_protocol(args, check_env(env_id, kwargs))


def test_default_protocols():
    # Episodic: 10 episodes over the env's own time limit, whatever --reset-steps says; no warm-up.
    episodic = {"kind": "episodic", "episodes": 10, "horizon": 10, "warmup": 0, "seed": 1_000_000}
    assert default_protocol(CONSTANT) == episodic
    assert default_protocol(CONSTANT, reset_steps=3, num_envs=4) == episodic
    assert default_protocol("Pendulum-v1")["horizon"] == 200
    # Continuing (the env's metadata, or --eval-continuing): 128 copies, 2500 warm-up steps, 20000 scored.
    continuing = {"kind": "continuing", "episodes": 128, "horizon": 20_000, "warmup": 2_500, "seed": 1_000_000}
    assert default_protocol(STEP_INDEX) == continuing
    assert default_protocol("queueing:QueueNetwork-v0", {"instance": "criss-cross"}, reset_steps=64) == continuing
    assert default_protocol("Pendulum-v1", eval_continuing=True) == continuing
    assert default_protocol(STEP_INDEX, eval_continuing=False, eval_horizon=7)["kind"] == "episodic"
    # Every part can be set.
    assert default_protocol(STEP_INDEX, eval_episodes=4, eval_horizon=30, eval_warmup=0, eval_seed=9) == {
        "kind": "continuing", "episodes": 4, "horizon": 30, "warmup": 0, "seed": 9}


def random_pendulum_policy():
    torch.manual_seed(0)
    agent = Agent(3, 1, action_low=[-2.0], action_high=[2.0])
    with torch.no_grad():
        agent.actor_mean[-1].weight.mul_(100)  # an agent whose actions matter
    return deterministic_numpy_policy(agent, (np.zeros(3), np.ones(3)), 10.0)


def test_common_random_numbers_the_same_policy_gets_the_same_score():
    policy = random_pendulum_policy()
    first = evaluate(policy, "Pendulum-v1", {}, protocol(episodes=4, horizon=50), native_vector=False)
    again = evaluate(policy, "Pendulum-v1", {}, protocol(episodes=4, horizon=50), native_vector=False)
    assert first == again and first["half_width"] > 0
    other_seed = evaluate(policy, "Pendulum-v1", {}, protocol(episodes=4, horizon=50, seed=6), native_vector=False)
    assert other_seed["mean"] != first["mean"]


def test_the_protocol_ignores_reset_steps_so_runs_share_one_registry(indir):
    summaries = [train(fast_args(reset_steps=reset_steps, eval_horizon=None, top_k=50, total_timesteps=256))
                 for reset_steps in (16, 32)]
    assert summaries[0]["protocol"] == summaries[1]["protocol"]
    assert summaries[0]["protocol"]["horizon"] == 200  # Pendulum's own limit
    index = read_instance(indir / "runs" / "checkpoints", "Pendulum-v1")
    assert {entry["run_name"] for entry in index["entries"]} == {summary["run_dir"].name for summary in summaries}


def test_a_registry_refuses_a_run_under_another_protocol(indir, capsys):
    train(fast_args(total_timesteps=256))
    before = read_instance(indir / "runs" / "checkpoints", "Pendulum-v1")
    assert ppo_continuous.main(["--env-id", "Pendulum-v1", "--num-envs", "2", "--num-steps", "128",
                                "--num-minibatches", "4", "--total-timesteps", "256", "--eval-horizon", "50",
                                "--eval-episodes", "3"]) == 2
    message = one_line_error(capsys.readouterr().err)
    assert '"episodes": 2' in message and '"episodes": 3' in message  # names both protocols
    assert read_instance(indir / "runs" / "checkpoints", "Pendulum-v1") == before and len(run_dirs(indir)) == 1


def test_eval_only_prints_the_score_with_its_interval_and_writes_json(indir):
    summary = train(fast_args(total_timesteps=256))
    best = torch.load(summary["run_dir"] / "best.pt", weights_only=True)
    result = run_cli("--eval-only", summary["run_dir"] / "best.pt", "--eval-json", "score.json", cwd=indir)
    assert result.returncode == 0, result.stderr
    written = json.loads((indir / "score.json").read_text())
    # The checkpoint's own protocol, and with common random numbers exactly the score it was saved with.
    assert written["protocol"] == best["protocol"] and written["episodes"] == 2
    assert written["mean"] == best["score"] and written["half_width"] == best["half_width"]
    assert written["checkpoint"] == str(summary["run_dir"] / "best.pt")
    assert f"LTA return {written['mean']:.6g} +- {written['half_width']:.3g} (95% CI over 2 episodes" in result.stdout
    assert len(run_dirs(indir)) == 1  # no training run
    # The protocol options apply on top of the checkpoint's.
    wider = evaluate_checkpoints(cli_args(["--eval-only", str(summary["run_dir"] / "best.pt"), "--eval-episodes", "5"]))
    assert wider["episodes"] == 5 and wider["protocol"]["horizon"] == 50


# ---------------------------------------------------------------------------------------------------------------
# A fixed policy on a queueing instance whose exact LTA return is known: c-mu is optimal on single-server-2class.
# ---------------------------------------------------------------------------------------------------------------

QUEUEING = "queueing:QueueNetwork-v0"
SINGLE_SERVER = {"instance": "single-server-2class"}
CMU_EXACT = -2.68333


@pytest.fixture(scope="module")
def baseline_scores():
    """c-mu and longest-queue under the default continuing protocol, with the per-copy LTA returns."""
    info = check_env(QUEUEING, SINGLE_SERVER)
    args, _ = ppo_continuous.resolved_args(Args(env_id=QUEUEING, env_kwargs=json.dumps(SINGLE_SERVER)))
    default = evaluation_protocol(args, info)
    per_copy, scores = [], {}
    original = ppo_support.mean_confidence_interval

    def spy(values, *rest):
        per_copy.append(np.array(values))
        return original(values, *rest)

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(ppo_support, "mean_confidence_interval", spy)
        for name in ("cmu", "longest"):
            scores[name] = evaluate(POLICIES[name]("single-server-2class"), QUEUEING, SINGLE_SERVER, default,
                                    info["native_vector"])
            scores[name]["per_copy"] = per_copy[-1]
    return info, default, scores


def test_cmu_under_the_default_continuing_protocol_contains_the_exact_value(baseline_scores):
    info, default, scores = baseline_scores
    assert info["native_vector"] and info["continuing"]
    assert default == {"kind": "continuing", "episodes": 128, "horizon": 20_000, "warmup": 2_500,
                       "seed": 1_000_000}
    cmu = scores["cmu"]
    assert cmu["mean"] - cmu["half_width"] <= CMU_EXACT <= cmu["mean"] + cmu["half_width"]
    assert cmu["half_width"] <= 0.02 * abs(CMU_EXACT)
    assert len(cmu["per_copy"]) == 128 and cmu["mean"] == pytest.approx(cmu["per_copy"].mean())


def test_common_random_numbers_make_paired_differences_precise(baseline_scores):
    _, _, scores = baseline_scores
    cmu, longest = scores["cmu"], scores["longest"]
    assert longest["mean"] < cmu["mean"]  # c-mu is optimal
    difference, difference_half_width = ppo_support.mean_confidence_interval(cmu["per_copy"] - longest["per_copy"])
    assert difference == pytest.approx(cmu["mean"] - longest["mean"])
    # Copy i of both policies sees the same random streams: the scores are strongly correlated, so the paired
    # interval is tighter than either score's and about half that of two independent evaluations.
    assert np.corrcoef(cmu["per_copy"], longest["per_copy"])[0, 1] > 0.5
    assert difference_half_width < min(cmu["half_width"], longest["half_width"])
    assert difference_half_width < 0.7 * np.hypot(cmu["half_width"], longest["half_width"])
    assert difference - difference_half_width > 0  # c-mu is better, significantly


# ---------------------------------------------------------------------------------------------------------------
# --compare A B: two checkpoints under one protocol, on the same seeds, with the paired difference
# ---------------------------------------------------------------------------------------------------------------

SMALL_CONTINUING = dict(eval_episodes=16, eval_horizon=2000, eval_warmup=200)


def test_compare_gives_the_paired_difference_on_common_random_numbers(indir):
    a, b = (train(fast_args(env_id=QUEUEING, env_kwargs=json.dumps(SINGLE_SERVER), seed=seed, total_timesteps=256,
                            **SMALL_CONTINUING))["run_dir"] / "final.pt" for seed in (1, 2))
    result = run_cli("--compare", a, b, "--eval-json", "compare.json", cwd=indir)
    assert result.returncode == 0, result.stderr
    written = json.loads((indir / "compare.json").read_text())
    first, second, difference = written["a"], written["b"], written["difference"]
    # Each score is the one --eval-only gives alone: the same protocol (A's) and the same seeds for both.
    alone = run_cli("--eval-only", b, "--eval-json", "b.json", cwd=indir)
    assert alone.returncode == 0, alone.stderr
    assert json.loads((indir / "b.json").read_text())["per_episode"] == second["per_episode"]
    assert first["protocol"] == second["protocol"] == {"kind": "continuing", "episodes": 16, "horizon": 2000,
                                                       "warmup": 200, "seed": 1_000_000}
    # The paired interval against a naive Student-t over the per-episode differences.
    differences = np.array(first["per_episode"]) - np.array(second["per_episode"])
    assert difference["mean"] == pytest.approx(first["mean"] - second["mean"])
    assert difference["half_width"] == pytest.approx(
        scipy.stats.t.ppf(0.975, 15) * differences.std(ddof=1) / np.sqrt(16))
    assert 0 < difference["half_width"] < difference["unpaired_half_width"]  # common random numbers pay
    assert f"A - B: {difference['mean']:.6g} +- {difference['half_width']:.3g} (paired 95% CI" in result.stdout
    # A checkpoint against itself: exactly zero, with a zero-width interval.
    itself = run_cli("--compare", a, a, "--eval-json", "itself.json", cwd=indir)
    assert itself.returncode == 0, itself.stderr
    same = json.loads((indir / "itself.json").read_text())["difference"]
    assert same["mean"] == 0.0 and same["half_width"] == 0.0 and same["unpaired_half_width"] > 0
