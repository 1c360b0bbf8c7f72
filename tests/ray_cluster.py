"""A Ray cluster of two nodes on this machine, started as README.md's steps say (token authentication; one CPU each,
so a pool of two actors runs one on each node); shared by tests/test_ray_engine.py and bench/bench_ray.py."""

import contextlib
import os
import secrets
import shutil
import socket
import subprocess
import sys
import tempfile
from pathlib import Path

RAY = str(Path(sys.executable).parent / "ray")


def _stop(temp_dir: str) -> None:
    """Kill the processes of this cluster only (`ray stop` would stop every Ray on the machine): by pid, those whose
    command line names its temp folder."""
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as fh:
                if temp_dir.encode() in fh.read():
                    os.kill(int(pid), 9)
        except (OSError, ProcessLookupError):
            pass


@contextlib.contextmanager
def two_nodes():
    """`ray start --head` and a second node joining it; this process joins at RAY_ADDRESS with the cluster's token.
    Yields {"address", "env"} (the nodes' environment)."""
    import ray

    assert not ray.is_initialized()
    temp_dir = tempfile.mkdtemp(prefix="ray", dir="/tmp")  # short: Ray's socket paths must fit in 107 bytes
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    auth = {"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": secrets.token_hex(32)}
    env = {**os.environ, **auth, "RAY_TMPDIR": temp_dir}
    common = ["--num-cpus=1", "--disable-usage-stats"]
    saved = {k: os.environ.get(k) for k in (*auth, "RAY_ADDRESS", "RAY_TMPDIR")}
    try:
        head = [RAY, "start", "--head", f"--port={port}", f"--temp-dir={temp_dir}", "--include-dashboard=false"]
        subprocess.run([*head, *common, "--resources", '{"head_node": 1}'], env=env, check=True, capture_output=True)
        second = [RAY, "start", f"--address=127.0.0.1:{port}", *common, "--resources", '{"second_node": 1}']
        subprocess.run(second, env=env, check=True, capture_output=True)
        os.environ.update({**auth, "RAY_ADDRESS": f"127.0.0.1:{port}", "RAY_TMPDIR": temp_dir})
        # `audit` reads these at start; this process imported Ray before, so Ray rereads them as it does itself
        # when it turns token authentication on (ray._private.authentication).
        ray._raylet.Config.initialize("")
        ray._raylet.AuthenticationTokenLoader.instance().reset_cache()
        yield {"address": f"127.0.0.1:{port}", "env": env}
    finally:
        ray.shutdown()
        _stop(temp_dir)
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
        shutil.rmtree(temp_dir, ignore_errors=True)
