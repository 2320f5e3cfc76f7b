"""Checkpoints through the trainer: the cross-run registry, load_checkpoint, resume, eval-only, early stop."""

import json
import subprocess
import sys

import numpy as np
import pytest
import torch

import ppo_continuous
from tests.conftest import FAST, REPO, run_cli, run_dirs, scalars

PENDULUM = ["--env-id", "Pendulum-v1", "--reset-steps", 32, *FAST]


def registry(workdir, instance="Pendulum-v1"):
    folder = workdir / "runs" / "checkpoints" / instance
    return folder, json.loads((folder / "index.json").read_text())


def test_registry_keeps_the_top_k_over_runs(workdir):
    every_score = []
    for seed in (1, 2):
        result = run_cli(*PENDULUM, "--total-timesteps", 512, "--seed", seed, "--top-k", 3, "--eval-episodes", 0,
                         cwd=workdir)
        assert result.returncode == 0, result.stderr
        every_score += [value for _, value in scalars(run_dirs(workdir)[-1])["charts/avg_LTA_return"]]
    folder, index = registry(workdir)
    assert [entry["score"] for entry in index] == pytest.approx(sorted(every_score, reverse=True)[:3])
    assert sorted(path.name for path in folder.glob("*.pt")) == sorted(entry["file"] for entry in index)
    for entry in index:
        checkpoint = torch.load(folder / entry["file"], weights_only=True)
        assert checkpoint["score"] == pytest.approx(entry["score"])
        assert checkpoint["instance"] == "Pendulum-v1" and checkpoint["global_step"] == entry["global_step"]
        assert set(ppo_continuous.CHECKPOINT_KEYS) <= set(checkpoint)
    # The leaderboard lists them.
    board = subprocess.run([sys.executable, str(REPO / "checkpoint_saver.py"), "runs/checkpoints"], cwd=workdir,
                           capture_output=True, text=True)
    assert board.returncode == 0 and "Pendulum-v1" in board.stdout
    assert all(entry["run_name"] in board.stdout for entry in index)


def test_lower_is_better_keeps_the_lowest(workdir):
    result = run_cli(*PENDULUM, "--total-timesteps", 512, "--top-k", 2, "--lower-is-better", "--eval-episodes", 0,
                     cwd=workdir)
    assert result.returncode == 0, result.stderr
    scores = [value for _, value in scalars(run_dirs(workdir)[0])["charts/avg_LTA_return"]]
    _, index = registry(workdir)
    assert [entry["score"] for entry in index] == pytest.approx(sorted(scores)[:2])
    best = torch.load(run_dirs(workdir)[0] / "best.pt", weights_only=True)
    assert best["score"] == pytest.approx(min(scores))


def test_problem_instance_and_env_kwargs_name_the_registry_folder(workdir):
    for extra in (["--problem-instance", "my-instance"], ["--env-kwargs", '{"g": 9.0}']):
        assert run_cli(*PENDULUM, "--total-timesteps", 256, "--eval-episodes", 0, *extra, cwd=workdir).returncode == 0
    folders = sorted(path.name for path in (workdir / "runs" / "checkpoints").iterdir())
    assert "my-instance" in folders
    assert any(name.startswith("Pendulum-v1__") and "g=9.0" in name for name in folders), folders


def test_load_checkpoint_reproduces_the_training_time_policy_exactly(workdir, monkeypatch):
    monkeypatch.chdir(workdir)
    args = ppo_continuous.Args(env_id="Pendulum-v1", total_timesteps=512, num_envs=2, num_steps=128,
                               num_minibatches=4, update_epochs=2, reset_steps=32, eval_episodes=0)
    summary = ppo_continuous.train(args, ppo_continuous.resolve_args(args))
    agent, obs_rms = summary["agent"], summary["obs_rms"]
    raw = np.random.default_rng(0).normal(scale=3.0, size=(50, 3)).astype(np.float32)
    with torch.no_grad():
        training_input = torch.from_numpy(ppo_continuous.normalize_observation(raw, obs_rms.mean, obs_rms.var, 10.0))
        want_action = agent.get_deterministic_action(training_input)
        want_value = agent.get_value(training_input)
        loaded, normalize_obs = ppo_continuous.load_checkpoint(summary["run_dir"] / "final.pt")
        assert torch.equal(normalize_obs(raw), training_input)
        assert torch.equal(loaded.get_deterministic_action(normalize_obs(raw)), want_action)
        assert torch.equal(loaded.get_value(normalize_obs(raw)), want_value)
    assert not loaded.training


def test_load_checkpoint_without_observation_normalisation_is_identity(workdir):
    assert run_cli(*PENDULUM, "--total-timesteps", 256, "--no-norm-obs", "--eval-episodes", 0,
                   cwd=workdir).returncode == 0
    _, normalize_obs = ppo_continuous.load_checkpoint(run_dirs(workdir)[0] / "final.pt")
    raw = np.array([[0.5, -0.25, 7.0]], dtype=np.float32)
    assert torch.equal(normalize_obs(raw), torch.from_numpy(raw))


def test_resume_continues_with_the_same_counters(workdir):
    assert run_cli(*PENDULUM, "--total-timesteps", 1024, "--eval-episodes", 0, cwd=workdir).returncode == 0
    (first,) = run_dirs(workdir)
    saved = torch.load(first / "final.pt", weights_only=True)
    assert saved["global_step"] == 1024 and saved["counters"]["rollouts"] == 4
    result = run_cli(*PENDULUM, "--total-timesteps", 2048, "--eval-episodes", 0, "--resume", first / "final.pt",
                     cwd=workdir)
    assert result.returncode == 0, result.stderr
    assert "resumed from" in result.stdout
    second = next(path for path in run_dirs(workdir) if path != first)
    logged = scalars(second)
    assert [(step, value) for step, value in logged["counters/rollouts"]] == [
        (1280, 5), (1536, 6), (1792, 7), (2048, 8)]
    assert logged["counters/updates"][0][1] == saved["counters"]["updates"] + 2
    # The learning-rate schedule continues where it was: rollout 5 of 8 with linear annealing.
    assert logged["charts/learning_rate"][0][1] == pytest.approx(3e-4 * (1 - 4 / 8))
    resumed = torch.load(second / "final.pt", weights_only=True)
    assert resumed["global_step"] == 2048
    assert resumed["obs_rms"]["count"] > saved["obs_rms"]["count"] + 1000  # statistics carried over, then grown


def test_resume_rejects_a_checkpoint_of_another_env(workdir):
    assert run_cli(*PENDULUM, "--total-timesteps", 256, "--eval-episodes", 0, cwd=workdir).returncode == 0
    result = run_cli("--env-id", "tests.envs:ConstantReward-v0", *FAST, "--total-timesteps", 256,
                     "--resume", run_dirs(workdir)[0] / "final.pt", cwd=workdir)
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert "observation/action sizes 3/1" in result.stderr


def test_eval_only_evaluates_a_checkpoint(workdir):
    assert run_cli(*PENDULUM, "--total-timesteps", 256, "--eval-episodes", 0, cwd=workdir).returncode == 0
    (run_dir,) = run_dirs(workdir)
    result = run_cli("--eval-only", run_dir / "best.pt", "--eval-episodes", 4, cwd=workdir)
    assert result.returncode == 0, result.stderr
    assert "eval: 4 episodes" in result.stdout and "LTA return" in result.stdout
    assert run_dirs(workdir) == [run_dir]  # no training run


def test_eval_only_rejects_a_file_that_is_not_a_checkpoint(workdir):
    (workdir / "junk.pt").write_bytes(b"not a checkpoint")
    result = run_cli("--eval-only", "junk.pt", cwd=workdir)
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert "cannot read checkpoint 'junk.pt'" in result.stderr


def test_final_evaluation_uses_the_best_agent_in_raw_units(workdir):
    result = run_cli("--env-id", "tests.envs:ConstantReward-v0", "--env-kwargs", '{"reward": 0.5}', *FAST,
                     "--total-timesteps", 256, "--eval-episodes", 3, cwd=workdir)
    assert result.returncode == 0, result.stderr
    logged = scalars(run_dirs(workdir)[0])
    assert logged["eval/LTA_return"][0][1] == 0.5 and logged["eval/episodic_return"][0][1] == 5.0


def test_early_stop_patience(workdir):
    # Constant reward: the first LTA measurement is the best and nothing improves on it afterwards.
    result = run_cli("--env-id", "tests.envs:ConstantReward-v0", *FAST, "--total-timesteps", 100000,
                     "--early-stop-patience", 3, "--eval-episodes", 0, cwd=workdir)
    assert result.returncode == 0, result.stderr
    assert "early stop: step 80/" in result.stdout  # 2 envs, episodes of 10 steps: 4th measurement at step 80
    assert len(scalars(run_dirs(workdir)[0])["charts/avg_LTA_return"]) == 4


def test_a_registry_ranked_the_other_way_is_refused_up_front(workdir):
    assert run_cli(*PENDULUM, "--total-timesteps", 256, "--eval-episodes", 0, cwd=workdir).returncode == 0
    before = registry(workdir)[1]
    result = run_cli(*PENDULUM, "--total-timesteps", 256, "--lower-is-better", cwd=workdir)
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert "lower_is_better" in result.stderr and len(result.stderr.strip().splitlines()) == 1
    assert registry(workdir)[1] == before and len(run_dirs(workdir)) == 1
