"""Checkpoints through the trainer: the cross-run registry of evaluated scores, load_checkpoint, early stop."""

import io
import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

import ppo_continuous
import ppo_support
from checkpoint_saver import entry_bytes, read_instance
from ppo_continuous import TrainError, load_checkpoint, train
from tests.conftest import REPO, fast_args, one_line_error, run_cli, run_dirs, scalars, values


def registry(workdir, instance="Pendulum-v1"):
    return read_instance(workdir / "runs" / "checkpoints", instance)


def test_registry_keeps_the_top_k_evaluated_scores_over_runs(indir):
    every_score, protocols = [], []
    for seed in (1, 2):
        summary = train(fast_args(reset_steps=32, seed=seed, top_k=3))
        every_score += values(scalars(summary["run_dir"]), "eval/LTA_return")
        protocols.append(summary["protocol"])
    index = registry(indir)
    assert index["protocol"] == protocols[0] == protocols[1] and index["top_k"] == 3
    assert [entry["score"] for entry in index["entries"]] == pytest.approx(sorted(every_score, reverse=True)[:3],
                                                                           abs=1e-6)
    for rank, entry in enumerate(index["entries"], start=1):
        checkpoint = torch.load(io.BytesIO(entry_bytes("runs/checkpoints", "Pendulum-v1", rank)), weights_only=True)
        assert checkpoint["score"] == entry["score"] and checkpoint["half_width"] == entry["half_width"] >= 0
        assert checkpoint["instance"] == "Pendulum-v1" and checkpoint["global_step"] == entry["global_step"]
        assert checkpoint["protocol"] == index["protocol"]
        assert set(ppo_support.CHECKPOINT_KEYS) <= set(checkpoint)
    # The leaderboard lists them.
    board = subprocess.run([sys.executable, str(REPO / "checkpoint_saver.py")], cwd=indir, capture_output=True,
                           text=True)
    assert board.returncode == 0 and "Pendulum-v1" in board.stdout
    # Each run, with the instance key its name starts with shown once, in the title.
    assert all(entry["run_name"].replace("Pendulum-v1__", "…__", 1) in board.stdout for entry in index["entries"])


def test_lower_is_better_keeps_the_lowest(indir):
    summary = train(fast_args(reset_steps=32, top_k=2, lower_is_better=True))
    scores = values(scalars(summary["run_dir"]), "eval/LTA_return")
    index = registry(indir)
    assert index["lower_is_better"] is True
    assert [entry["score"] for entry in index["entries"]] == pytest.approx(sorted(scores)[:2], abs=1e-6)
    assert torch.load(summary["run_dir"] / "best.pt", weights_only=True)["score"] == pytest.approx(min(scores),
                                                                                                   abs=1e-6)
    assert summary["best"]["mean"] == pytest.approx(min(scores), abs=1e-6)


def test_problem_instance_and_env_kwargs_name_the_registry_instance_and_the_run(indir):
    instances = []
    for options in (dict(problem_instance="my-instance"), dict(env_kwargs='{"g": 9.0}')):
        summary = train(fast_args(total_timesteps=256, **options))
        assert summary["run_dir"].name.startswith(summary["instance"] + "__ppo_continuous__1__")
        assert registry(indir, summary["instance"])["entries"]
        instances.append(summary["instance"])
    assert instances[0] == "my-instance"
    assert instances[1].startswith("Pendulum-v1__") and "g=9.0" in instances[1], instances


def test_load_checkpoint_reproduces_the_training_time_policy_exactly(indir):
    summary = train(fast_args(reset_steps=32))
    agent, obs_rms = summary["agent"], summary["obs_rms"]
    raw = np.random.default_rng(0).normal(scale=3.0, size=(50, 3)).astype(np.float32)
    with torch.no_grad():
        training_input = torch.from_numpy(ppo_support.normalize_observation(raw, obs_rms.mean, obs_rms.var, 10.0))
        want_action = agent.get_deterministic_action(training_input)
        want_value = agent.get_value(training_input)
        loaded, normalize_obs = load_checkpoint(summary["run_dir"] / "final.pt")
        assert torch.equal(normalize_obs(raw), training_input)
        assert torch.equal(loaded.get_deterministic_action(normalize_obs(raw)), want_action)
        assert torch.equal(loaded.get_value(normalize_obs(raw)), want_value)
    assert not loaded.training


def test_load_checkpoint_of_a_registry_entry_by_instance_and_rank(indir):
    summary = train(fast_args(reset_steps=32, top_k=2))
    raw = np.random.default_rng(2).normal(scale=3.0, size=(20, 3)).astype(np.float32)
    # One run: the registry's best entry is the agent of its best.pt.
    from_registry, normalize_registry = load_checkpoint(instance="Pendul", rank=1)
    from_file, normalize_file = load_checkpoint(summary["run_dir"] / "best.pt")
    with torch.no_grad():
        assert torch.equal(from_registry.get_deterministic_action(normalize_registry(raw)),
                           from_file.get_deterministic_action(normalize_file(raw)))
    assert registry(indir)["entries"][0]["score"] == summary["best"]["mean"]
    for options, message in [(dict(rank=3), "give a rank from 1 to 2"), (dict(instance="Hopper"), "no instance"),
                             (dict(registry="elsewhere"), "no registry at elsewhere/registry.db")]:
        with pytest.raises(TrainError, match=message):
            load_checkpoint(**{"instance": "Pendulum-v1", **options})


def test_load_checkpoint_of_a_squashed_policy_acts_as_evaluation_scored_it(indir):
    summary = train(fast_args(total_timesteps=256, squash_actions=True))
    loaded, normalize_obs = load_checkpoint(summary["run_dir"] / "final.pt")
    obs_rms = summary["obs_rms"]
    scored = ppo_support.deterministic_numpy_policy(summary["agent"], (obs_rms.mean, obs_rms.var), 10.0)
    raw = np.random.default_rng(1).normal(scale=3.0, size=(20, 3)).astype(np.float32)
    with torch.no_grad():
        action = loaded.get_deterministic_action(normalize_obs(raw)).numpy()
        mean = loaded.actor_mean(normalize_obs(raw)).numpy()
    np.testing.assert_allclose(action, -2.0 + 4.0 * (np.tanh(mean) + 1) / 2, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(action, scored(raw), rtol=1e-4, atol=1e-5)


def test_load_checkpoint_without_observation_normalisation_is_identity(indir):
    summary = train(fast_args(total_timesteps=256, norm_obs=False))
    _, normalize_obs = load_checkpoint(summary["run_dir"] / "final.pt")
    raw = np.array([[0.5, -0.25, 7.0]], dtype=np.float32)
    assert torch.equal(normalize_obs(raw), torch.from_numpy(raw))


def test_load_checkpoint_raises_train_error_on_files_that_are_not_checkpoints(tmp_path):
    (tmp_path / "junk.pt").write_bytes(b"not a checkpoint")
    (tmp_path / "empty.pt").write_bytes(b"")
    torch.save({"agent": {}}, tmp_path / "partial.pt")
    torch.save([1, 2, 3], tmp_path / "list.pt")
    for name, message in [("junk.pt", "the file is corrupt or not a checkpoint"), ("missing.pt", "No such file"),
                          ("empty.pt", "the file is corrupt or not a checkpoint"),
                          ("partial.pt", "is not a checkpoint of ppo_continuous.py"),
                          ("list.pt", "is not a checkpoint of ppo_continuous.py")]:
        with pytest.raises(TrainError, match=message):
            load_checkpoint(tmp_path / name)


def test_the_readme_snippet_works_from_another_directory(indir):
    summary = train(fast_args(total_timesteps=256))
    elsewhere = indir / "elsewhere"
    elsewhere.mkdir()
    snippet = (f"from ppo_continuous import load_checkpoint\n"
               f"agent, normalize_obs = load_checkpoint({str(summary['run_dir'].resolve() / 'best.pt')!r})\n"
               f"raw_obs = [[1.0, 0.0, 0.5]]\n"
               f"action = agent.get_deterministic_action(normalize_obs(raw_obs)).detach().numpy()\n"
               f"print(action.shape, float(action[0, 0]))\n")
    result = subprocess.run([sys.executable, "-c", snippet], cwd=elsewhere, capture_output=True, text=True,
                            env={**os.environ, "PYTHONPATH": str(REPO)}, timeout=120)
    assert result.returncode == 0, result.stderr
    shape, action = result.stdout.split(")")
    assert shape == "(1, 1" and -2.0 <= float(action) <= 2.0


def test_early_stop_counts_evaluations_without_improvement(indir):
    # Constant reward: the first evaluation is the best and no later one improves on it. The first training
    # measurement is the only nomination, so the evaluations run at rollouts 1 (nominated), 2, 4 and 6 (the grid
    # of 512 steps): patience 3 stops after the 4th, at step 6 x 256, not after 4 rollouts.
    summary = train(fast_args(env_id="tests.envs:ConstantReward-v0", eval_horizon=None, total_timesteps=100_000,
                              eval_every=512, early_stop_patience=3))
    assert summary["stopped_early"] and summary["counters"]["global_step"] == 6 * 256
    logged = scalars(summary["run_dir"])
    assert [step for step, _ in logged["eval/LTA_return"]] == [256, 512, 1024, 1536, 1536]  # + the final agent
    assert summary["counters"]["updates"] == 6 * 2  # the run learned after every rollout, the last included


def test_early_stop_waits_for_the_first_update(indir):
    # Patience 1 with an evaluation every rollout: the run still learns at least once before it can stop.
    summary = train(fast_args(env_id="tests.envs:ConstantReward-v0", eval_horizon=None, total_timesteps=100_000,
                              eval_every=256, early_stop_patience=1))
    assert summary["stopped_early"] and summary["counters"]["updates"] > 0
    assert summary["counters"]["global_step"] == 2 * 256


def test_a_registry_ranked_the_other_way_is_refused_up_front(indir, capsys):
    train(fast_args(total_timesteps=256))
    before = registry(indir)
    assert ppo_continuous.main(["--env-id", "Pendulum-v1", "--num-envs", "2", "--num-steps", "128",
                                "--num-minibatches", "4", "--eval-episodes", "2", "--eval-horizon", "50",
                                "--total-timesteps", "256", "--lower-is-better"]) == 2
    assert "lower_is_better" in one_line_error(capsys.readouterr().err)
    assert registry(indir) == before and len(run_dirs(indir)) == 1


def test_a_checkpoint_carries_its_problem_definition_and_evaluates_from_anywhere(indir):
    # An instance file given by a relative path: the checkpoint must not depend on it.
    instance = json.loads((REPO / "queueing" / "instances" / "single-server-2class.json").read_text())
    (indir / "mine.json").write_text(json.dumps(instance))
    summary = train(fast_args(env_id="queueing:QueueNetwork-v0", env_kwargs='{"instance": "mine.json"}',
                              total_timesteps=256, eval_episodes=4, eval_horizon=500, eval_warmup=50))
    final = torch.load(summary["run_dir"] / "final.pt", weights_only=True)
    definition = final["problem_definition"]
    assert definition["allocation"] == "proportional"
    assert {key: definition["instance"][key] for key in instance} == instance  # the file's content, validated
    elsewhere = indir / "elsewhere"
    elsewhere.mkdir()
    result = run_cli("--eval-only", (summary["run_dir"] / "final.pt").resolve(), "--eval-json", "score.json",
                     cwd=elsewhere)
    assert result.returncode == 0, result.stderr
    assert json.loads((elsewhere / "score.json").read_text())["mean"] == final["score"]  # the same network
    # Envs that offer no definition: None.
    pendulum = train(fast_args(total_timesteps=256))
    assert torch.load(pendulum["run_dir"] / "final.pt", weights_only=True)["problem_definition"] is None
