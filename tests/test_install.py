"""`pip install -e .`: the modules and the queueing package import from any directory (no network: the build uses
the installed setuptools)."""

import shutil
import subprocess
import sys

from tests.conftest import REPO

SOURCES = ["pyproject.toml", "requirements.txt", "README.md", "ppo_continuous.py", "ppo_support.py",
           "checkpoint_saver.py", "sweep.py", "queueing"]


def test_an_editable_install_imports_from_another_directory(tmp_path):
    source, prefix, elsewhere = tmp_path / "checkout", tmp_path / "prefix", tmp_path / "elsewhere"
    source.mkdir()
    elsewhere.mkdir()
    for name in SOURCES:  # a copy, so the build leaves nothing in the repository
        (shutil.copytree if (REPO / name).is_dir() else shutil.copy)(REPO / name, source / name)
    install = subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-build-isolation", "--no-deps",
                              "--no-index", "-e", str(source), "--prefix", str(prefix)], capture_output=True,
                             text=True, timeout=300)
    assert install.returncode == 0, install.stderr
    (site_packages,) = prefix.glob("lib/python*/site-packages")
    check = (f"import site; site.addsitedir({str(site_packages)!r})\n"
             "import checkpoint_saver, ppo_continuous, ppo_support, sweep\n"
             "from queueing.env import Network\n"
             "print(ppo_continuous.__file__)\n"
             "print(Network.from_instance('criss-cross').num_buffers)\n")  # an instance file shipped in the package
    result = subprocess.run([sys.executable, "-c", check], cwd=elsewhere, capture_output=True, text=True,
                            timeout=300, env={"PATH": "/usr/bin:/bin", "HOME": str(tmp_path)})
    assert result.returncode == 0, result.stderr
    module_file, buffers = result.stdout.split()
    assert module_file == str(source / "ppo_continuous.py") and buffers == "3"
    assert (prefix / "bin" / "ppo-continuous").exists()
