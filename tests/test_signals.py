"""Stopping a run (SIGTERM, Ctrl-C, twice) through the real process, and train() as a library function that
leaves the process's global state as it found it."""

import contextlib
import os
import pty
import random
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from ppo_continuous import TrainError, train
from tests.conftest import FAST, FAST_EVAL, REPO, SCRIPT, fast_args, run_dirs

pytestmark = pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="reads CPU times from /proc")

# A run far longer than any test: whatever stops it is the signal.
LONG_LEARNING_PHASE = ["--env-id", "Pendulum-v1", "--num-envs", 1, "--num-steps", 64, "--num-minibatches", 1,
                       "--update-epochs", 1_000_000, "--total-timesteps", 64, *FAST_EVAL]


class Cli:
    """The CLI in its own session (process group), its stdout read line by line in the background."""

    def __init__(self, args, cwd, tty=False):
        self.output, self.lines = bytearray(), []
        if tty:
            reader, writer = pty.openpty()
        else:
            reader, writer = os.pipe()
        self.process = subprocess.Popen([sys.executable, str(SCRIPT), *map(str, args)], cwd=cwd,
                                        env={**os.environ, "PYTHONPATH": str(REPO), "COLUMNS": "120"},
                                        stdout=writer, stderr=subprocess.PIPE, start_new_session=True)
        os.close(writer)
        self.thread = threading.Thread(target=self._read, args=(reader,), daemon=True)
        self.thread.start()

    def _read(self, reader):
        while True:
            try:
                chunk = os.read(reader, 65536)
            except OSError:  # a pty's reader gets EIO once the process is gone
                chunk = b""
            if not chunk:
                os.close(reader)
                return
            self.output += chunk

    @property
    def stdout(self):
        return self.output.decode(errors="replace")

    def cpu_seconds(self):
        fields = Path(f"/proc/{self.process.pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")

    def wait_for(self, condition, what, timeout=180):
        deadline = time.monotonic() + timeout
        while not condition():
            if self.process.poll() is not None:
                pytest.fail(f"the run ended before {what}: {self.process.returncode}\n{self.stdout}\n"
                            f"{self.process.stderr.read().decode()}")
            if time.monotonic() > deadline:
                self.kill()
                pytest.fail(f"no {what} within {timeout} s")
            time.sleep(0.05)

    def wait_until_learning(self):
        """Started (the protocol line is printed just before the first rollout), then 1.5 s of CPU more than
        a 64-step rollout and a small evaluation need: the long phase after them is under way."""
        self.wait_for(lambda: "evaluation protocol:" in self.stdout, "start")
        started = self.cpu_seconds()
        self.wait_for(lambda: self.cpu_seconds() > started + 1.5, "learning phase")

    def finish(self, timeout=120):
        try:
            stderr = self.process.communicate(timeout=timeout)[1].decode()
        except subprocess.TimeoutExpired:
            self.kill()
            pytest.fail(f"still running {timeout} s after the signal")
        self.thread.join(timeout=10)
        return self.process.returncode, stderr

    def kill(self):
        try:
            os.killpg(self.process.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


def child_processes(pid):
    children = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            if int(stat.read_text().rsplit(")", 1)[1].split()[1]) == pid:
                children.append(int(stat.parent.name))
        except (OSError, ValueError, IndexError):
            pass
    return children


def process_state(pid):
    return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]


def test_sigterm_to_the_process_group_with_async_envs_saves_and_exits_130(workdir):
    cli = Cli(["--env-id", "Pendulum-v1", *FAST, *FAST_EVAL, "--async-envs", "--no-compile", "--total-timesteps", 10_000_000,
               "--save-latest-every", 1], cwd=workdir)
    cli.wait_for(lambda: list(workdir.glob("runs/*/latest.pt")), "first rollout")  # training, env workers up
    (latest,) = workdir.glob("runs/*/latest.pt")
    # The env workers ignore Ctrl-C and SIGTERM, whoever sends them: the run goes on.
    workers = child_processes(cli.process.pid)
    assert len(workers) == 2
    for worker in workers:
        os.kill(worker, signal.SIGINT)
        os.kill(worker, signal.SIGTERM)
    step = torch.load(latest, weights_only=True)["global_step"]
    cli.wait_for(lambda: torch.load(latest, weights_only=True)["global_step"] >= step + 512, "two more rollouts")
    assert all(process_state(worker) not in "ZX" for worker in workers)

    os.killpg(cli.process.pid, signal.SIGTERM)  # the shell's way: the env workers get it too
    code, stderr = cli.finish()
    assert code == 130, stderr
    assert "Traceback" not in stderr
    assert stderr.count("stopping at the end of this step") == 1  # the trainer's alone, not the workers'
    assert "interrupted: step" in cli.stdout
    (run_dir,) = run_dirs(workdir)
    final = torch.load(run_dir / "final.pt", weights_only=True)
    assert step + 512 <= final["global_step"] < 10_000_000 and final["score"] is None  # no evaluation when stopped
    time.sleep(0.5)
    with pytest.raises(ProcessLookupError):  # no env worker left behind
        os.killpg(cli.process.pid, 0)


def test_ctrl_c_through_a_pipe_whose_reader_dies_still_saves_the_run(workdir):
    """`python ppo_continuous.py ... 2>&1 | tee run.log` and Ctrl-C: tee dies too, and every later write to the
    pipe fails. The run must still stop cleanly and save final.pt."""
    reader, writer = os.pipe()
    process = subprocess.Popen([sys.executable, str(SCRIPT), "--env-id", "Pendulum-v1", *map(str, FAST),
                                *map(str, FAST_EVAL), "--no-compile", "--total-timesteps", "10000000",
                                "--save-latest-every", "1"],
                               cwd=workdir, env={**os.environ, "PYTHONPATH": str(REPO)}, stdout=writer, stderr=writer,
                               start_new_session=True)
    os.close(writer)
    try:
        deadline = time.monotonic() + 180
        while not list(workdir.glob("runs/*/latest.pt")):  # training: a rollout is done
            assert process.poll() is None and time.monotonic() < deadline, os.read(reader, 1 << 20).decode()
            time.sleep(0.05)
        os.close(reader)  # the reader dies first, as tee does when the terminal's Ctrl-C reaches it
        os.killpg(process.pid, signal.SIGINT)
        code = process.wait(timeout=120)
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGKILL)
    assert code == 130  # not 141 (SIGPIPE), not 1 (a BrokenPipeError)
    (run_dir,) = run_dirs(workdir)
    final = torch.load(run_dir / "final.pt", weights_only=True)
    assert 0 < final["global_step"] < 10_000_000 and final["score"] is None


def test_ctrl_c_stops_a_long_learning_phase_within_seconds(workdir):
    cli = Cli(LONG_LEARNING_PHASE, cwd=workdir)
    cli.wait_until_learning()
    signalled = time.monotonic()
    cli.process.send_signal(signal.SIGINT)
    code, stderr = cli.finish()
    assert code == 130, stderr
    assert time.monotonic() - signalled < 60  # the phase alone would take hours
    assert "Traceback" not in stderr
    (run_dir,) = run_dirs(workdir)
    final = torch.load(run_dir / "final.pt", weights_only=True)
    assert final["global_step"] == 64  # the rollout was complete: the signal came during learning
    assert 1 <= final["counters"]["updates"] < 1_000_000


def test_a_second_ctrl_c_interrupts_at_once_and_closes_the_progress_bar(workdir):
    # The first Ctrl-C waits for the end of the step, and an evaluation is one step: a very long one here.
    cli = Cli(["--env-id", "Pendulum-v1", "--num-envs", 1, "--num-steps", 64, "--num-minibatches", 1,
               "--total-timesteps", 64, "--eval-episodes", 2, "--eval-horizon", 100_000_000, "--eval-every", 64],
              cwd=workdir, tty=True)
    cli.wait_until_learning()  # here: evaluating the agent after its first rollout
    assert "\x1b[?25l" in cli.stdout  # a live progress bar on the terminal hides the cursor
    cli.process.send_signal(signal.SIGINT)
    cli.wait_for(lambda: "stopping at the end of this step" in cli.stdout, "first Ctrl-C")  # (shown above the bar)
    signalled = time.monotonic()
    cli.process.send_signal(signal.SIGINT)
    code, stderr = cli.finish()
    assert code == 130, stderr
    assert time.monotonic() - signalled < 60
    assert stderr == "interrupted: files already saved are intact (they are written atomically)\n"
    assert cli.stdout.rfind("\x1b[?25h") > cli.stdout.rfind("\x1b[?25l")  # the bar closed: the cursor is back


# ---------------------------------------------------------------------------------------------------------------
# train() as a library function
# ---------------------------------------------------------------------------------------------------------------

def global_state():
    return (signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM), torch.get_num_threads(),
            random.getstate(), repr(np.random.get_state()), torch.get_rng_state())


def assert_same_state(before, after):
    assert after[:4] == before[:4] and after[4] == before[4] and torch.equal(after[5], before[5])


@pytest.fixture
def three_threads():
    threads = torch.get_num_threads()
    torch.set_num_threads(3)  # not the run's 1
    yield
    torch.set_num_threads(threads)


def test_train_returns_a_summary_and_restores_the_global_state(indir, three_threads):
    before = global_state()
    evaluations = []
    summary = train(fast_args(total_timesteps=1024, eval_every=256),
                    on_evaluation=lambda step, evaluation: evaluations.append(step) or step >= 512)
    assert_same_state(before, global_state())
    assert summary["run_dir"].exists() and summary["final"] is not None and not summary["interrupted"]
    assert evaluations[:2] == [256, 512]
    assert summary["counters"]["global_step"] == 512  # on_evaluation returned True: the run stopped


@pytest.mark.parametrize("options, message", [
    (dict(num_envs=0), "--num-envs must be positive"),  # refused before the run starts
    (dict(env_id="tests.envs:ConstantReward-v0", env_kwargs='{"fail_at_step": 1}'), "fails at its first step"),
    (dict(env_id="tests.envs:ConstantReward-v0", env_kwargs='{"terminate_after": 5}', average_reward=True,
          eval_horizon=None), "--average-reward is for continuing tasks"),  # raised inside the training loop
])
def test_train_raises_train_error_and_restores_the_global_state(indir, three_threads, options, message):
    before = global_state()
    with pytest.raises(TrainError, match=message):
        train(fast_args(**options))
    assert_same_state(before, global_state())
