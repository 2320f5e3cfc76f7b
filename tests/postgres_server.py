"""A throwaway PostgreSQL server on 127.0.0.1 for tests, from the binaries the `pgserver` wheel bundles.

`pip install -r requirements.txt` brings the server (pgserver ships PostgreSQL's own binaries); nothing else
needs installing. PostgreSQL refuses to run as root, so as root (CI) the server runs as `nobody`, from a copy
of the binaries that `nobody` can read (site-packages may sit under root's private home).
"""

import contextlib
import importlib.util
import os
import pwd
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from pathlib import Path

import psycopg


def bundled_binaries():
    """The folder holding bin/, lib/ and share/ of pgserver's PostgreSQL, or None if pgserver is absent."""
    spec = importlib.util.find_spec("pgserver")  # located without importing it: its import has side effects
    if spec is None or not spec.submodule_search_locations:
        return None
    folder = Path(spec.submodule_search_locations[0]) / "pginstall"
    return folder if (folder / "bin" / "postgres").exists() else None


def free_port():
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@contextlib.contextmanager
def postgres_server(timeout=60):
    """Start a server on a free loopback port with a fresh data folder; yield its URL; stop and delete it."""
    install = bundled_binaries()
    root = Path(tempfile.mkdtemp(prefix="sweep-postgres-"))
    run_as = {}
    try:
        if os.geteuid() == 0:
            nobody = pwd.getpwnam("nobody")
            root.chmod(0o755)
            # The binaries find their libraries at $ORIGIN/../../../pgserver.libs: copy that layout.
            site = root / "site-packages"
            shutil.copytree(install.parent.parent / "pgserver.libs", site / "pgserver.libs")
            install = Path(shutil.copytree(install, site / "pgserver" / "pginstall", symlinks=True))
            run_as = {"user": nobody.pw_uid, "group": nobody.pw_gid, "extra_groups": []}
        data = root / "data"
        data.mkdir(mode=0o700)
        if run_as:
            os.chown(data, run_as["user"], run_as["group"])
        subprocess.run([install / "bin" / "initdb", "-D", data, "-U", "postgres", "--auth=trust", "--encoding=UTF8",
                        "--locale=C", "--no-sync"], check=True, capture_output=True, **run_as)
        port = free_port()
        log = open(root / "server.log", "wb")
        server = subprocess.Popen([install / "bin" / "postgres", "-D", data, "-h", "127.0.0.1", "-p", str(port),
                                   "-k", "", "-c", "fsync=off", "-c", "max_connections=50"],
                                  stdout=log, stderr=subprocess.STDOUT, **run_as)
        url = f"postgresql://postgres@127.0.0.1:{port}/postgres"
        deadline = time.monotonic() + timeout
        while True:
            try:
                psycopg.connect(url).close()
                break
            except psycopg.OperationalError:
                if server.poll() is not None or time.monotonic() > deadline:
                    server.kill()
                    raise RuntimeError(f"PostgreSQL did not start: {(root / 'server.log').read_text()[-2000:]}")
                time.sleep(0.1)
        try:
            yield url
        finally:
            server.send_signal(signal.SIGINT)  # PostgreSQL's "fast" shutdown: closes the clients' connections
            try:
                server.wait(timeout=30)
            except subprocess.TimeoutExpired:
                server.kill()
                server.wait()
            log.close()
    finally:
        shutil.rmtree(root, ignore_errors=True)
