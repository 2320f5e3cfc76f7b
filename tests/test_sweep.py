"""sweep.py end to end: trials x seeds on the embedded journal storage and on a real PostgreSQL server, the report's
table, curves and plots read back against the runs' own files, intervals (coverage and naive formulas), paired
differences, failed and killed trials, pruning, labelled output, and --track offline."""

import csv
import json
import math
import os
import re
import signal
import socket
import subprocess
import sys
import time
import warnings
from pathlib import Path

import numpy as np
import optuna
import pytest
import torch
from scipy import stats

import sweep
from checkpoint_saver import read_instance
from tests.conftest import REPO, one_line_error, run_cli, scalars
from tests.postgres_server import bundled_binaries, postgres_server

SWEEP = REPO / "sweep.py"
# A few thousand Pendulum steps per run, evaluated on 4 episodes: seconds per run.
TINY = [f"--param={option}" for option in ("total_timesteps=2048", "num_envs=2", "num_steps=256", "num_minibatches=4",
                                           "update_epochs=2", "eval_episodes=4", "eval_every=1024")]
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
# Student's t quantile 0.975 at 1 degree of freedom (the Cauchy distribution's): tan(0.475 pi) = 12.706.
T_975_1DOF = math.tan(0.475 * math.pi)


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


def test_sweep_on_embedded_storage_with_two_workers_then_report(workdir, monkeypatch, capsys):
    """2 configurations x 2 seeds in 2 worker processes: trials, objectives, registry, table, curves, plots."""
    result = run_cli("run", "--study-name", "tiny", "--instance", "Pendulum-v1", "--seeds", "1", "2",
                     "--param", "learning_rate=[0.001, 0.003]", "--workers", "2", *TINY, cwd=workdir, script=SWEEP)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "study tiny: 2 complete" in result.stdout
    # Each worker's lines carry its label, and within a trial the trial's number, which its runs' names hold.
    worker_lines = [line for line in result.stdout.splitlines() if not line.startswith(("study ", "report: "))]
    assert worker_lines and all(re.match(r"\[w[12]( trial [01])?\] ", line) for line in worker_lines), worker_lines
    run_lines = [line for line in worker_lines if "] run: runs/" in line]
    assert len(run_lines) == 4 and all(f"-t{line.split(' trial ')[1][0]}__" in line for line in run_lines)

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
    registry_entries = read_instance(workdir / "runs" / "checkpoints", "Pendulum-v1")["entries"]
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
        # Student's t over two seeds: mean +- t(0.975, 1 dof) * s / sqrt(2), where s / sqrt(2) = |a - b| / 2.
        half_width = T_975_1DOF * abs(seeds[0] - seeds[1]) / 2
        assert float(row["ci_low"]) == pytest.approx(np.mean(seeds) - half_width, abs=1e-9)
        assert float(row["ci_high"]) == pytest.approx(np.mean(seeds) + half_width, abs=1e-9)
        assert int(row["runs"]) == 2
    # The second trial against the best, paired by seed: the same t interval over the two differences.
    by_seed = [{run["seed"]: run["score"] for run in trial.user_attrs["runs"]} for trial in ranked]
    differences = [by_seed[1][seed] - by_seed[0][seed] for seed in (1, 2)]
    assert table[0]["vs_best"] == "nan" and float(table[1]["vs_best"]) == pytest.approx(np.mean(differences), abs=1e-9)
    half_width = T_975_1DOF * abs(differences[0] - differences[1]) / 2
    assert float(table[1]["vs_best_ci_low"]) == pytest.approx(np.mean(differences) - half_width, abs=1e-9)
    assert float(table[1]["vs_best_ci_high"]) == pytest.approx(np.mean(differences) + half_width, abs=1e-9)
    markdown = (report / "table.md").read_text()
    best_row = table[0]
    assert (f"| 1 | {best_row['trial']} | {float(best_row['learning_rate'])} | {float(best_row['score']):.5g} "
            f"[{float(best_row['ci_low']):.5g}, {float(best_row['ci_high']):.5g}] | best | 2 |") in markdown
    assert "2 trials: 2 complete." in markdown and "Intervals are 95% CIs: Student-t intervals over seeds." in markdown
    assert "python checkpoint_saver.py --instance Pendulum-v1" in markdown
    # Each trial is linked to its runs' registry entries, by instance and rank.
    trial_of = {Path(run["run_dir"]).name: trial.number for trial in trials for run in trial.user_attrs["runs"]}
    for rank, entry in enumerate(registry_entries, start=1):
        assert f"| {trial_of[entry['run_name']]} | Pendulum-v1 | {rank} | {entry['score']:.5g} ± " in markdown

    curves = read_csv(report / "curves.csv")
    for number, runs_curves in curves_of.items():
        rows = [row for row in curves if int(row["trial"]) == number]
        grid, expected = interpolated_mean(runs_curves)
        assert [int(row["step"]) for row in rows] == grid
        assert [float(row["value"]) for row in rows] == pytest.approx(expected, abs=1e-5)
        # The band: Student's t over the two seeds' interpolated values at each step.
        seeds = np.array([np.interp(grid, sorted(curve), [curve[step] for step in sorted(curve)])
                          for curve in runs_curves])
        half_widths = T_975_1DOF * np.abs(seeds[0] - seeds[1]) / 2
        assert [float(row["ci_low"]) for row in rows] == pytest.approx(expected - half_widths, abs=1e-4)
        assert [float(row["ci_high"]) for row in rows] == pytest.approx(expected + half_widths, abs=1e-4)
        assert {row["seeds"] for row in rows} == {"2"} and {row["instance"] for row in rows} == {"Pendulum-v1"}
    for name in ("learning_curves.png", "optimization_history.png", "param_importances.png"):
        assert (report / name).read_bytes()[:8] == PNG_SIGNATURE, name
    assert read_csv(report / "references.csv") == []  # no reference lines for a gymnasium env

    # A tag no run logged is refused in one line, before any file is written.
    monkeypatch.chdir(workdir)
    with pytest.raises(SystemExit) as exit_info:
        sweep.main(["report", "--study-name", "tiny", "--curve-tag", "no/such", "--out", "other"])
    assert exit_info.value.code == 2 and not (workdir / "other").exists()
    assert one_line_error(capsys.readouterr().err) == (
        "error: no curve has the tag 'no/such' in the runs of the best trials: give --curve-tag a TensorBoard tag "
        "they logged, e.g. eval/LTA_return or charts/learning_rate")


def coverage(aggregate, samples, true_mean):
    _, low, high = sweep.interval(samples, aggregate)
    return np.mean((low <= true_mean) & (true_mean <= high))


@pytest.mark.parametrize("seeds", [2, 3, 5])
def test_intervals_cover_the_mean_at_their_level_with_few_seeds(seeds):
    """On simulated normal scores the table's 95% CI covers the true mean 93-97% of the time with 2, 3 and 5 seeds
    (20,000 studies each: the coverage's standard error is 0.15%), where a percentile bootstrap covers 50-82%."""
    rng = np.random.default_rng(seeds)
    assert 0.93 <= coverage("mean", [rng.normal(-3.0, 2.0, size=(20_000, seeds))], -3.0) <= 0.97
    # Two instances with different means and spreads, stratified: variances summed, Welch-Satterthwaite dof.
    instances = [rng.normal(-3.0, 0.5, size=(20_000, seeds)), rng.normal(10.0, 4.0, size=(20_000, seeds))]
    assert 0.93 <= coverage("mean", instances, 3.5) <= 0.97


def test_interquartile_mean_interval_coverage_as_the_report_states():
    """The Tukey-McLaughlin interval of the interquartile mean: 92-93% on normal scores, as the report says."""
    rng = np.random.default_rng(0)
    for runs in (4, 5, 8):
        assert 0.915 <= coverage("iqm", [rng.normal(1.0, 3.0, size=(20_000, runs))], 1.0) <= 0.935


def test_intervals_and_paired_differences_against_naive_formulas():
    """One instance: scipy's one-sample and paired t intervals. Two instances: the stratified mean and its
    Welch-Satterthwaite interval written out by hand. IQM: the Tukey-McLaughlin interval written out."""
    scores = [3.1, 2.4, 4.0, 3.3]
    point, low, high = sweep.interval([scores], "mean")
    reference = stats.ttest_1samp(scores, 0.0).confidence_interval(0.95)
    assert (point, low, high) == pytest.approx((np.mean(scores), reference.low, reference.high), abs=1e-12)

    config = {"space": {"learning_rate": ["choices", [0.1, 0.2, 0.3]]}, "instances": [["A-v0", "{}"], ["B-v0", "{}"]],
              "aggregate": "mean", "lower_is_better": False}
    study = optuna.create_study(direction="maximize")
    distribution = optuna.distributions.CategoricalDistribution([0.1, 0.2, 0.3])
    table = {0.1: [[5.0, 6.0, 7.0], [20.0, 24.0, 29.0]], 0.2: [[4.0, 6.5, 5.0], [19.0, 21.0, 30.0]],
             0.3: [[4.5, 5.5, 6.0], [1.0, 2.0, 3.0]]}
    for learning_rate, per_instance in table.items():
        runs = [{"instance": index, "seed": seed, "score": score} for index, scores in enumerate(per_instance)
                for seed, score in zip((1, 2, 3), scores)]
        study.add_trial(optuna.trial.create_trial(
            params={"learning_rate": learning_rate}, distributions={"learning_rate": distribution},
            value=np.mean(per_instance), user_attrs={"runs": runs}))
    _, _, _, rows = sweep.trial_rows(study, config)
    assert [row["learning_rate"] for row in rows] == [0.1, 0.2, 0.3]
    best = np.array(table[0.1])
    for row in rows[1:]:
        differences = np.array(table[row["learning_rate"]]) - best  # paired by (instance, seed)
        variances = differences.var(axis=1, ddof=1) / 3
        dof = variances.sum() ** 2 / (variances ** 2 / 2).sum()
        half_width = stats.t.ppf(0.975, dof) * math.sqrt(variances.sum()) / 2
        assert (row["vs_best"], row["vs_best_ci_low"], row["vs_best_ci_high"]) == pytest.approx(
            (differences.mean(), differences.mean() - half_width, differences.mean() + half_width), abs=1e-12)
        # One instance alone: scipy's paired t interval.
        reference = stats.ttest_rel(table[row["learning_rate"]][0], best[0]).confidence_interval(0.95)
        assert row["A-v0 ci_low"] == pytest.approx(
            sweep.interval([table[row["learning_rate"]][0]], "mean")[1], abs=1e-12)
        paired_a = sweep.interval([differences[0]], "mean")
        assert paired_a[1:] == pytest.approx((reference.low, reference.high), abs=1e-12)

    # Interquartile mean of 8 runs: cut 2 at each end, winsorize, s_w / ((1 - 2 * 2/8) sqrt(8)), 8 - 4 - 1 dof.
    runs = [9.0, 1.0, 4.0, 7.0, 3.0, 5.0, 2.0, 6.0]
    winsorized = [3.0, 3.0, 3.0, 4.0, 5.0, 6.0, 6.0, 6.0]
    half_width = stats.t.ppf(0.975, 3) * np.std(winsorized, ddof=1) / (0.5 * math.sqrt(8))
    assert sweep.interval([runs[:4], runs[4:]], "iqm") == pytest.approx((4.5, 4.5 - half_width, 4.5 + half_width))


@pytest.mark.parametrize("option, message", [
    ("--aggregate=iqm", "error: --aggregate iqm cuts a quarter of the runs at each end, so below 4 runs per trial it "
                        "is the mean; here 3 (seeds x instances): use --aggregate mean or more seeds"),
    ("--pruner=wilcoxon", "error: --pruner wilcoxon can prune only after 4 runs of a trial (with fewer, no one-sided "
                          "p-value is below 0.1); here 3 (seeds x instances): use --pruner median or more seeds")])
def test_options_that_need_four_runs_are_refused_below(indir, capsys, option, message):
    with pytest.raises(SystemExit) as exit_info:
        sweep.main(["run", "--study-name", "few", "--instance", "Pendulum-v1", "--seeds", "1", "2", "3", option,
                    *TINY])
    assert exit_info.value.code == 2 and one_line_error(capsys.readouterr().err) == message
    assert not (indir / "runs").exists()


def test_a_sweep_whose_every_trial_fails_exits_with_the_first_error(indir, capsys):
    with pytest.raises(SystemExit) as exit_info:
        sweep.main(["run", "--study-name", "nosuch", "--instance", "NoSuchEnv-v0", "--param",
                    "learning_rate=[0.001, 0.003]", *TINY])
    output = capsys.readouterr()
    assert exit_info.value.code == 2 and "Traceback" not in output.err
    assert output.err.splitlines()[-1] == ("error: every trial failed; the first, trial 0: TrainError: cannot make "
                                           "env 'NoSuchEnv-v0': Environment `NoSuchEnv` doesn't exist.")
    assert "report:" not in output.out
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # matplotlib warned of an empty legend on the empty plot it drew
        sweep.main(["report", "--study-name", "nosuch"])
    report = indir / "runs" / "sweeps" / "nosuch" / "report"
    markdown = (report / "table.md").read_text()
    assert "2 trials: 2 fail." in markdown and "checkpoint" not in markdown
    assert not (report / "learning_curves.png").exists() and "learning_curves.png" not in markdown


def test_a_killed_worker_trial_is_failed_and_run_again_on_resume(workdir):
    """SIGKILL (as the out-of-memory killer sends) mid-trial leaves a RUNNING trial in the journal; running the
    command again marks it failed, runs its configuration again and completes the budget."""
    command = [sys.executable, str(SWEEP), "run", "--study-name", "killed", "--instance", "Pendulum-v1",
               "--param", "learning_rate=[0.001, 0.003]", "--pruner", "none", *TINY, "--param=total_timesteps=4096"]
    worker = subprocess.Popen(command, cwd=workdir, env={**os.environ, "PYTHONPATH": str(REPO)},
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    journal = workdir / "runs" / "sweeps" / "killed" / "optuna.journal"
    deadline = time.monotonic() + 120
    while not list((workdir / "runs").glob("Pendulum-v1__killed-t0__*/events.out.tfevents.*")):
        assert worker.poll() is None and time.monotonic() < deadline, "the sweep did not start its first run"
        time.sleep(0.1)
    worker.send_signal(signal.SIGKILL)
    worker.wait()
    [running] = journal_study(workdir, "killed").get_trials()
    assert running.state == optuna.trial.TrialState.RUNNING
    assert running.user_attrs["worker"] == f"{socket.gethostname()}:{worker.pid}"

    result = run_cli(*command[2:], cwd=workdir, script=SWEEP)
    assert result.returncode == 0, result.stderr[-3000:]
    assert (f"trial 0: its worker {socket.gethostname()}:{worker.pid} is gone; marked failed, queued to run again"
            in result.stdout)
    assert "study killed: 2 complete, 1 fail" in result.stdout
    killed, retry, other = journal_study(workdir, "killed").get_trials()
    assert killed.state == optuna.trial.TrialState.FAIL
    assert killed.user_attrs["error"] == (f"its worker {socket.gethostname()}:{worker.pid} died (killed, e.g. by the "
                                          f"out-of-memory killer)")
    assert retry.state == other.state == optuna.trial.TrialState.COMPLETE
    assert retry.params == killed.params and retry.system_attrs["failed_trial"] == 0
    assert "error" not in retry.user_attrs and len(retry.user_attrs["runs"]) == 1
    assert {retry.params["learning_rate"], other.params["learning_rate"]} == {0.001, 0.003}


@pytest.mark.skipif(bundled_binaries() is None, reason="no PostgreSQL server binaries: pip install -r requirements.txt")
def test_two_workers_join_one_study_on_postgresql(workdir, monkeypatch):
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
        # Each was given --n-trials 2 and both joined the study: the budget is the study's, 2 trials in all. Which
        # worker ran which trial depends on how fast each started, so it is not asserted.
        assert all("study shared in" in out for out, _ in outputs)
        assert [trial.state for trial in trials] == [optuna.trial.TrialState.COMPLETE] * 2
        assert {trial.user_attrs["worker"].split(":")[1] for trial in trials} <= {str(w.pid) for w in workers}
        for trial in trials:
            assert 1e-4 <= trial.params["learning_rate"] <= 1e-2
            scores = [torch.load(Path(run["run_dir"]) / "best.pt", weights_only=True)["score"]
                      for run in trial.user_attrs["runs"]]
            assert trial.value == pytest.approx(np.mean(scores), abs=1e-12)
        # Their runs fed the checkpoint registry in the study's database, not each machine's own folder.
        run_names = {Path(run["run_dir"]).name for trial in trials for run in trial.user_attrs["runs"]}
        entries = read_instance(url, "Pendulum-v1")["entries"]
        assert entries and {entry["run_name"] for entry in entries} <= run_names
        assert not (workdir / "runs" / "checkpoints").exists()
        # A third worker that names only the study joins it with the stored settings; its budget is spent.
        result = run_cli("run", "--study-name", "shared", "--storage", url, "--n-trials", "2", cwd=workdir,
                         script=SWEEP)
        assert result.returncode == 0, result.stderr[-2000:]
        assert len(optuna.load_study(study_name="shared", storage=url).get_trials()) == 2

        # A worker whose heartbeats stop (killed on another machine) has its trial failed and queued again, and
        # the budget counts that configuration once.
        monkeypatch.setattr(sweep, "GRACE_SECONDS", 1)
        storage = sweep.open_storage(url)
        study = optuna.load_study(study_name="shared", storage=storage)
        trial = study.ask({"learning_rate": optuna.distributions.FloatDistribution(1e-4, 1e-2, log=True)})
        storage.record_heartbeat(trial._trial_id)
        time.sleep(2)
        optuna.storages.fail_stale_trials(study)
        stale, retry = study.get_trials()[2:]
        assert stale.state == optuna.trial.TrialState.FAIL and retry.state == optuna.trial.TrialState.WAITING
        assert retry.params == stale.params and retry.system_attrs["failed_trial"] == stale.number
        assert sweep.trials_spent(study) == 2
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


def fake_trainer(evaluation_steps, score, stop_answers):
    """A stand-in for `train`: evaluations at the given steps of each seed with `score(args, step)`, stopping when
    the callback asks; then, as the trainer's `finish`, the last agent's evaluation (0.5 below the last one), of
    which the callback hears too."""
    def fake_train(args, on_evaluation):
        evaluations = []
        for step in evaluation_steps[args.seed]:
            evaluations.append({"mean": score(args, step), "half_width": 0.1, "episodes": 4, "protocol": {}})
            stop_answers.append(on_evaluation(step, evaluations[-1]))
            if stop_answers[-1]:
                break
        final = {**evaluations[-1], "mean": evaluations[-1]["mean"] - 0.5}
        on_evaluation(step, final)
        return {"run_dir": Path("runs") / f"fake-{args.seed}", "interrupted": False, "final": final,
                "best": max(evaluations + [final], key=lambda evaluation: evaluation["mean"])}
    return fake_train


@pytest.mark.parametrize("score", ["best", "final"])
def test_pruner_sees_the_objectives_measure_at_the_same_steps_in_every_trial(monkeypatch, score):
    """Runs evaluated at irregular steps still report one value per closed span, at steps shared by all trials,
    of the objective's own measure: the best evaluation so far, or with --score final the latest. A trial the
    pruner stops is recorded as pruned, its run is asked to stop, and that run's score is still recorded."""
    config = sweep.build_config(sweep.parser().parse_args(
        ["run", "--instance", "Pendulum-v1", "--seeds", "1", "2", "--param", "learning_rate=uniform(0, 1)",
         "--param", "total_timesteps=1000", "--sampler", "random", "--score", score]))
    stop_answers = []

    def score_of(args, step):  # grows with the step and the learning rate, with a dip at step 430
        return args.learning_rate * (step - (300 if step == 430 else 0)) - (args.seed - 1)

    monkeypatch.setattr(sweep, "train", fake_trainer({1: [150, 420, 430, 1000], 2: [100, 350, 900]}, score_of,
                                                     stop_answers))
    study = optuna.create_study(direction="maximize", pruner=optuna.pruners.ThresholdPruner(lower=0.25))
    study.enqueue_trial({"learning_rate": 0.001})  # scores at most 1: pruned once a span closes below 0.25
    study.enqueue_trial({"learning_rate": 0.01})
    study.optimize(lambda trial: sweep.objective(trial, config, "fake", {}), n_trials=2)

    pruned, complete = study.trials
    assert complete.state == optuna.trial.TrialState.COMPLETE
    # Seed 1 scores 1.5, 4.2, 1.3, 10 and its last agent 9.5; seed 2: 0, 2.5, 8 and 7.5.
    run_scores = {"best": [10.0, 8.0], "final": [9.5, 7.5]}[score]
    assert [run["score"] for run in complete.user_attrs["runs"]] == pytest.approx(run_scores)
    assert complete.value == pytest.approx(np.mean(run_scores))
    spans, offset = sweep.PRUNING_POINTS, sweep.PRUNING_POINTS + 1
    # Seed 1: a span closes when a later span's evaluation arrives. Seed 2 (run 1) reports the mean of seed 1's
    # score and its own so far.
    expected = {**{span: 1.5 for span in range(3, 8)},
                **{span: {"best": 4.2, "final": 1.3}[score] for span in range(8, spans)},
                **{offset + span: (run_scores[0] + 0.0) / 2 for span in range(2, 7)},
                **{offset + span: (run_scores[0] + 2.5) / 2 for span in range(7, 18)}}
    assert complete.intermediate_values == pytest.approx(expected)
    assert pruned.state == optuna.trial.TrialState.PRUNED and pruned.params == {"learning_rate": 0.001}
    assert pruned.intermediate_values == pytest.approx({span: 0.001 * 150 for span in range(3, 8)})
    assert stop_answers[:3] == [False, True, False], "the pruned run was asked to stop at its second evaluation"
    [run] = pruned.user_attrs["runs"]  # its last agent was evaluated: the run is recorded with its score
    assert run["pruned_at"] == 420 and run["seed"] == 1
    assert run["score"] == pytest.approx({"best": 0.42, "final": 0.42 - 0.5}[score])


def test_wilcoxon_pruner_pairs_each_run_with_the_best_trials_run(monkeypatch):
    """--pruner wilcoxon: each finished run's score is reported at its (seed, instance) index in the design, in an
    order shuffled per trial; a trial worse than the best on 4 paired runs (one-sided p = 1/16) is pruned there."""
    config = sweep.build_config(sweep.parser().parse_args(
        ["run", "--instance", "Pendulum-v1", "--seeds", "1", "2", "3", "4", "5", "--param",
         "learning_rate=uniform(0, 1)", "--sampler", "random", "--pruner", "wilcoxon"]))
    calls = []

    def fake_train(args, on_evaluation):
        calls.append(on_evaluation)
        evaluation = {"mean": args.learning_rate * 10 + args.seed, "half_width": 0.1, "episodes": 4}
        return {"run_dir": Path("runs") / "fake", "interrupted": False, "final": evaluation, "best": evaluation}

    monkeypatch.setattr(sweep, "train", fake_train)
    study = optuna.create_study(direction="maximize", pruner=sweep.make_pruner(config))
    study.enqueue_trial({"learning_rate": 0.5})
    study.enqueue_trial({"learning_rate": 0.1})  # 4 below the best on every seed
    study.optimize(lambda trial: sweep.objective(trial, config, "fake", {}), n_trials=2)

    best, worse = study.trials
    assert best.state == optuna.trial.TrialState.COMPLETE and best.value == pytest.approx(5 + 3)
    assert best.intermediate_values == pytest.approx({index: 5 + index + 1 for index in range(5)})
    assert calls == [None] * 9, "no reports within runs"
    assert worse.state == optuna.trial.TrialState.PRUNED
    runs = worse.user_attrs["runs"]
    assert len(runs) == 4 and worse.intermediate_values == pytest.approx({run["seed"] - 1: 1 + run["seed"]
                                                                         for run in runs})
    order = list(np.random.default_rng(worse.number).permutation(5)[:4] + 1)
    assert [run["seed"] for run in runs] == order


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


def test_queueing_reference_lines_are_exact_where_the_solver_can_and_honest_simulations_elsewhere():
    from sweep import reference_lines

    instance = ("queueing:QueueNetwork-v0", json.dumps({"instance": "single-server-2class"}))
    exact_lines = {line["name"]: line for line in reference_lines(instance, 0.05, exact_values=True)}
    assert exact_lines["cmu"]["value"] == pytest.approx(-2.68333, abs=2e-4)  # c-mu is optimal here
    assert exact_lines["optimal"]["value"] == pytest.approx(exact_lines["cmu"]["value"], abs=1e-5)
    assert all(line["value"] <= exact_lines["optimal"]["value"] + 1e-6 for line in exact_lines.values())
    simulated = {line["name"]: line for line in reference_lines(instance, 0.05, exact_values=False)}
    assert "optimal" not in simulated
    for name in ("cmu", "maxweight"):
        line = simulated[name]
        assert 0 < line["half_width"] <= 0.05 * abs(line["value"])
        assert abs(line["value"] - exact_lines[name]["value"]) <= 1.5 * line["half_width"]
