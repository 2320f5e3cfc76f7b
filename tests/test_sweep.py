"""sweep.py end to end: trials x seeds on the embedded journal storage and on a real PostgreSQL server, the report's
table, curves and plots read back against the runs' own files, failed trials, pruning, and --track offline."""

import csv
import os
import json
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import optuna
import pytest
import torch

import sweep
from tests.conftest import REPO, run_cli, scalars
from tests.postgres_server import bundled_binaries, postgres_server

SWEEP = REPO / "sweep.py"
# A few thousand Pendulum steps per run, evaluated on 4 episodes: seconds per run.
TINY = [f"--param={option}" for option in ("total_timesteps=2048", "num_envs=2", "num_steps=256", "num_minibatches=4",
                                           "update_epochs=2", "eval_episodes=4", "eval_every=1024")]
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def journal_study(workdir, name):
    storage = optuna.storages.JournalStorage(optuna.storages.journal.JournalFileBackend(
        str(workdir / "runs" / "sweeps" / name / "optuna.journal")))
    return optuna.load_study(study_name=name, storage=storage)


def read_csv(path):
    with open(path, newline="") as file:
        return list(csv.DictReader(file))


def interpolated_mean(curves):
    """What the report must plot for one configuration: the seeds' curves ({step: value}, the last value logged
    at a step) on all their steps, averaged."""
    start, end = max(min(curve) for curve in curves), min(max(curve) for curve in curves)
    grid = sorted({step for curve in curves for step in curve if start <= step <= end})
    return grid, np.mean([np.interp(grid, sorted(curve), [curve[step] for step in sorted(curve)])
                          for curve in curves], axis=0)


def test_sweep_on_embedded_storage_with_two_workers_then_report(workdir):
    """2 configurations x 2 seeds in 2 worker processes: trials, objectives, registry, table, curves, plots."""
    result = run_cli("run", "--study-name", "tiny", "--instance", "Pendulum-v1", "--seeds", "1", "2",
                     "--param", "learning_rate=[0.001, 0.003]", "--workers", "2", *TINY, cwd=workdir, script=SWEEP)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "study tiny: 2 complete" in result.stdout

    study = journal_study(workdir, "tiny")
    trials = study.get_trials()
    assert [trial.state for trial in trials] == [optuna.trial.TrialState.COMPLETE] * 2
    assert sorted(trial.params["learning_rate"] for trial in trials) == [0.001, 0.003]
    assert len({trial.user_attrs["worker"] for trial in trials}) == 2, "each worker process ran one trial"
    curves_of = {}
    for trial in trials:
        runs = trial.user_attrs["runs"]
        assert sorted(run["seed"] for run in runs) == [1, 2]
        for run in runs:
            run_dir = Path(run["run_dir"])
            assert run_dir.parent == workdir.resolve() / "runs" and f"tiny-t{trial.number}" in run_dir.name
            best = torch.load(run_dir / "best.pt", weights_only=True)
            assert best["args"]["learning_rate"] == trial.params["learning_rate"]
            assert best["args"]["num_threads"] == 1
            evaluations = scalars(run_dir)["eval/LTA_return"]
            # The run's score is its best.pt's evaluated score, which is its best evaluation.
            assert run["score"] == pytest.approx(best["score"], abs=1e-12)
            assert best["score"] == pytest.approx(max(value for _, value in evaluations), abs=1e-5)
        # The objective is the mean over seeds of the runs' own evaluated scores.
        own_scores = [torch.load(Path(run["run_dir"]) / "best.pt", weights_only=True)["score"] for run in runs]
        assert trial.value == pytest.approx(np.mean(own_scores), abs=1e-12)
        curves_of[trial.number] = [dict(scalars(run["run_dir"])["eval/LTA_return"]) for run in runs]
    registry = json.loads((workdir / "runs" / "checkpoints" / "Pendulum-v1" / "index.json").read_text())
    registry_entries = registry["entries"] if isinstance(registry, dict) else registry
    assert registry_entries and all("__tiny-t" in entry["run_name"] for entry in registry_entries)

    result = run_cli("report", "--study-name", "tiny", cwd=workdir, script=SWEEP)
    assert result.returncode == 0, result.stderr[-3000:]
    report = workdir / "runs" / "sweeps" / "tiny" / "report"
    ranked = sorted(trials, key=lambda trial: trial.value, reverse=True)
    table = read_csv(report / "table.csv")
    assert [int(row["trial"]) for row in table] == [trial.number for trial in ranked]
    for row, trial in zip(table, ranked):
        assert float(row["learning_rate"]) == trial.params["learning_rate"]
        assert float(row["score"]) == pytest.approx(trial.value, abs=1e-12)
        seeds = [run["score"] for run in trial.user_attrs["runs"]]
        # Percentile bootstrap of the mean of two seeds: the interval lies within the two scores.
        assert min(seeds) - 1e-9 <= float(row["ci_low"]) <= float(row["score"]) <= float(row["ci_high"]) <= max(seeds) + 1e-9
        assert int(row["runs"]) == 2
    markdown = (report / "table.md").read_text()
    best_row = table[0]
    assert (f"| 1 | {best_row['trial']} | {float(best_row['learning_rate'])} | {float(best_row['score']):.5g} "
            f"[{float(best_row['ci_low']):.5g}, {float(best_row['ci_high']):.5g}] | 2 |") in markdown
    assert "2 trials: 2 complete." in markdown

    curves = read_csv(report / "curves.csv")
    for number, runs_curves in curves_of.items():
        rows = [row for row in curves if int(row["trial"]) == number]
        grid, expected = interpolated_mean(runs_curves)
        assert [int(row["step"]) for row in rows] == grid
        assert [float(row["value"]) for row in rows] == pytest.approx(expected, abs=1e-5)
        assert all(float(row["ci_low"]) - 1e-6 <= float(row["value"]) <= float(row["ci_high"]) + 1e-6 for row in rows)
        assert {row["seeds"] for row in rows} == {"2"} and {row["instance"] for row in rows} == {"Pendulum-v1"}
    for name in ("learning_curves.png", "optimization_history.png", "param_importances.png"):
        assert (report / name).read_bytes()[:8] == PNG_SIGNATURE, name
    assert read_csv(report / "references.csv") == []  # no reference lines for a gymnasium env


@pytest.mark.skipif(bundled_binaries() is None, reason="no PostgreSQL server binaries: pip install -r requirements.txt")
def test_two_workers_join_one_study_on_postgresql(workdir):
    """Two `sweep.py run` commands, as on two machines, share one study through a real PostgreSQL server."""
    started = time.monotonic()
    with postgres_server() as url:
        server_seconds = time.monotonic() - started
        command = [sys.executable, str(SWEEP), "run", "--study-name", "shared", "--storage", url,
                   "--instance", "Pendulum-v1", "--seeds", "1", "2", "--sampler", "random", "--n-trials", "2",
                   "--param", "learning_rate=loguniform(1e-4, 1e-2)", *TINY]
        env = {**os.environ, "PYTHONPATH": str(REPO)}
        workers = [subprocess.Popen(command, cwd=workdir, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                    text=True) for _ in range(2)]
        outputs = [worker.communicate(timeout=240) for worker in workers]
        assert [worker.returncode for worker in workers] == [0, 0], [err[-2000:] for _, err in outputs]
        study = optuna.load_study(study_name="shared", storage=url)
        trials = study.get_trials()
        assert [trial.state for trial in trials] == [optuna.trial.TrialState.COMPLETE] * 2
        assert len({trial.user_attrs["worker"] for trial in trials}) == 2, "both workers ran a trial"
        for trial in trials:
            assert 1e-4 <= trial.params["learning_rate"] <= 1e-2
            scores = [torch.load(Path(run["run_dir"]) / "best.pt", weights_only=True)["score"]
                      for run in trial.user_attrs["runs"]]
            assert trial.value == pytest.approx(np.mean(scores), abs=1e-12)
        # A third worker that names only the study joins it with the stored settings; its budget is spent.
        result = run_cli("run", "--study-name", "shared", "--storage", url, "--n-trials", "2", cwd=workdir,
                         script=SWEEP)
        assert result.returncode == 0, result.stderr[-2000:]
        assert len(optuna.load_study(study_name="shared", storage=url).get_trials()) == 2
    print(f"PostgreSQL server started in {server_seconds:.2f} s")


def test_a_failing_trial_is_recorded_and_the_study_goes_on(workdir, monkeypatch, capsys):
    """A bad hyperparameter fails its trial (with the trainer's message), the next trial runs; --track is passed on."""
    result = run_cli("run", "--study-name", "bad", "--instance", "Pendulum-v1", "--sampler-seed", "1", "--track",
                     "--param", "learning_rate=[-1.0, 0.001]", *TINY, cwd=workdir, script=SWEEP,
                     env={"WANDB_MODE": "offline"})
    assert result.returncode == 0, result.stderr[-3000:]
    assert "Traceback" not in result.stderr
    failed, complete = journal_study(workdir, "bad").get_trials()
    assert failed.state == optuna.trial.TrialState.FAIL and failed.params == {"learning_rate": -1.0}
    assert failed.user_attrs["error"] == "TrainError: --learning-rate must be positive, got -1.0"
    assert complete.state == optuna.trial.TrialState.COMPLETE and complete.number == 1
    assert list(workdir.rglob("offline-run-*")), "the sweep passes --track to the trainer"
    monkeypatch.chdir(workdir)
    with pytest.raises(SystemExit) as exit_info:  # joining with other settings is refused in one line
        sweep.main(["run", "--study-name", "bad", "--instance", "Pendulum-v1", "--param", "learning_rate=0.1"])
    assert exit_info.value.code == 2
    assert capsys.readouterr().err == ("error: study 'bad' exists with other settings (sampler_seed, space): to join "
                                       "or resume it give only --study-name and --storage, or choose a new "
                                       "--study-name\n")

    result = run_cli("report", "--study-name", "bad", cwd=workdir, script=SWEEP)
    assert result.returncode == 0, result.stderr[-3000:]
    markdown = (workdir / "runs" / "sweeps" / "bad" / "report" / "table.md").read_text()
    assert "2 trials: 1 complete, 1 fail." in markdown
    assert '| 0 | {"learning_rate": -1.0} | TrainError: --learning-rate must be positive, got -1.0 |' in markdown
    assert [row["trial"] for row in read_csv(workdir / "runs" / "sweeps" / "bad" / "report" / "table.csv")] == ["1"]


def test_pruner_sees_every_trial_at_the_same_steps(monkeypatch):
    """Runs evaluated at irregular steps still report one value per closed span, at steps shared by all trials;
    a trial the pruner stops is recorded as pruned and its run is asked to stop."""
    config = sweep.build_config(sweep.parser().parse_args(
        ["run", "--instance", "Pendulum-v1", "--seeds", "1", "2", "--param", "learning_rate=uniform(0, 1)",
         "--param", "total_timesteps=1000", "--sampler", "random"]))
    evaluation_steps = {1: [150, 420, 430, 1000], 2: [100, 350, 900]}
    stop_answers = []

    def fake_train(args, on_evaluation):
        for step in evaluation_steps[args.seed]:
            # Scores grow with the step and the learning rate; the second seed scores 1 less.
            stop = on_evaluation(step, {"mean": args.learning_rate * step - (args.seed - 1), "half_width": 0.1,
                                        "episodes": 4, "protocol": {}})
            stop_answers.append(stop)
            if stop:
                break
        return {"run_dir": Path("runs") / f"fake-{args.seed}", "interrupted": False, "final": None,
                "best": {"mean": args.learning_rate * step - (args.seed - 1), "half_width": 0.1, "episodes": 4}}

    monkeypatch.setattr(sweep, "train", fake_train)
    study = optuna.create_study(direction="maximize", pruner=optuna.pruners.ThresholdPruner(lower=0.25))
    study.enqueue_trial({"learning_rate": 0.001})  # scores at most 1: pruned once a span closes below 0.25
    study.enqueue_trial({"learning_rate": 0.01})
    study.optimize(lambda trial: sweep.objective(trial, config, "fake", {}), n_trials=2)

    pruned, complete = study.trials
    assert complete.state == optuna.trial.TrialState.COMPLETE
    assert complete.value == pytest.approx(np.mean([0.01 * 1000, 0.01 * 900 - 1]))
    spans, offset = sweep.PRUNING_POINTS, sweep.PRUNING_POINTS + 1
    # Seed 1: a span closes when a later span's evaluation arrives; the value is the best evaluation so far.
    # Seed 2 (run 1) reports the mean of seed 1's score and its own best so far.
    expected = {**{span: 0.01 * 150 for span in range(3, 8)}, **{span: 0.01 * 430 for span in range(8, spans)},
                **{offset + span: (10 + 0.01 * 100 - 1) / 2 for span in range(2, 7)},
                **{offset + span: (10 + 0.01 * 350 - 1) / 2 for span in range(7, 18)}}
    assert complete.intermediate_values == pytest.approx(expected)
    assert pruned.state == optuna.trial.TrialState.PRUNED and pruned.params == {"learning_rate": 0.001}
    assert pruned.intermediate_values == pytest.approx({span: 0.001 * 150 for span in range(3, 8)})
    assert stop_answers[:3] == [False, True, False], "the pruned run was asked to stop at its second evaluation"


def test_track_offline_writes_wandb_run_files(workdir):
    """`--track` logs to Weights & Biases; WANDB_MODE=offline writes the run's files locally, without network."""
    result = run_cli("--env-id", "Pendulum-v1", "--track", "--total-timesteps", "512", "--num-envs", "2",
                     "--num-steps", "256", "--num-minibatches", "4", "--update-epochs", "1", "--eval-episodes", "2",
                     cwd=workdir, env={"WANDB_MODE": "offline"})
    assert result.returncode == 0, result.stderr[-3000:]
    offline_runs = list(workdir.rglob("offline-run-*"))
    # One run folder: a wandb folder inside the TensorBoard logdir would be mirrored into itself by sync_tensorboard.
    assert len(offline_runs) == 1, offline_runs
    assert list(offline_runs[0].glob("run-*.wandb")), "the offline run holds its event log"
