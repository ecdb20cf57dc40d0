"""``lcr rollout-servers`` (rollout/node.py): a run config's servers on a rollout node of their own.

Real ``lcr serve`` processes on loopback: the command writes their advertised URLs once every one
answers, a server killed behind its back is restarted on the same URL, and SIGTERM stops them all
(exit 0, ports closed).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import psutil
import pytest

from megatron_lcr.rollout.node import advertised_url
from tests.distributed import REPO_ROOT

pytestmark = pytest.mark.e2e


def get(url: str) -> dict:
    with urllib.request.urlopen(url, timeout=10) as response:
        return json.loads(response.read() or b"{}")


def wait_until(predicate, timeout_s: float, what: str) -> None:
    deadline = time.monotonic() + timeout_s
    while not predicate():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.5)


def healthy(url: str) -> bool:
    try:
        with urllib.request.urlopen(f"{url}/health", timeout=5) as response:
            return response.status == 200
    except OSError:
        return False


def test_advertised_url_replaces_the_bind_address():
    assert advertised_url("http://0.0.0.0:30001", "node17") == "http://node17:30001"
    assert advertised_url("http://0.0.0.0:30001", "fd00::5") == "http://[fd00::5]:30001"


def test_rollout_servers_write_urls_restart_the_dead_and_stop_on_sigterm(tmp_path):
    urls_file = tmp_path / "urls" / "node.txt"
    cmd = [sys.executable, "-m", "megatron_lcr.cli", "rollout-servers", "--host", "0.0.0.0", "--advertise", "127.0.0.1",
           "--urls-file", str(urls_file), "--log-dir", str(tmp_path / "logs"), "examples/tiny/depo.yaml",
           "rollout.server.num_servers=2"]
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT), "HF_HUB_OFFLINE": "1"}
    node = subprocess.Popen(cmd, cwd=REPO_ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        wait_until(lambda: urls_file.is_file() or node.poll() is not None, 120, "the URLs file")
        urls = urls_file.read_text().split()
        assert len(urls) == 2 and all(u.startswith("http://127.0.0.1:") for u in urls)
        for url in urls:
            assert healthy(url)
            assert Path(get(f"{url}/model_info")["model_path"]).resolve() == (REPO_ROOT / "examples/tiny/base").resolve()
        # Kill the first server's process tree: the node notices and starts it again on its port.
        port = int(urls[0].rsplit(":", 1)[1])
        victims = [p for p in psutil.Process(node.pid).children(recursive=True)
                   if any(c.laddr and c.laddr.port == port and c.status == psutil.CONN_LISTEN
                          for c in p.net_connections(kind="inet"))]
        assert victims, "no process listens on the first server's port"
        for proc in victims:
            proc.kill()
        wait_until(lambda: not healthy(urls[0]), 30, "the killed server to go down")
        wait_until(lambda: healthy(urls[0]), 120, "the killed server to be restarted")
        node.send_signal(signal.SIGTERM)
        out, _ = node.communicate(timeout=60)
    finally:
        if node.poll() is None:
            node.kill()
    assert node.returncode == 0, out[-2000:]
    assert "server0" in out and "died; restarting" in out
    assert not any(healthy(url) for url in urls)
