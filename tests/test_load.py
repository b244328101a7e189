"""Several sessions at once: each keeps its own settings and gets its own results, and GPU work
(every forward of the shared model, every job) runs one at a time.

The first test drives the app's job queue and session registry with threads acting as browser
tabs on one shared tiny model. The second (marker `browser`) starts the real dashboard on
127.0.0.1 and opens it in three headless Chromium pages.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch
from conftest import save_tiny

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from app.engine import Backend, ModelCache, ModelKey, perplexity_job  # noqa: E402
from app.jobs import DONE, JobQueue  # noqa: E402
from qroar.perplexity import EvalConfig  # noqa: E402
from qroar.quant import QuantConfig  # noqa: E402
from qroar.recipe import Recipe  # noqa: E402
from qroar.rope import PIConfig  # noqa: E402
from qroar.workbench import Workbench  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
DOCS = [torch.randint(3, 128, (160,), generator=torch.Generator().manual_seed(i)) for i in range(2)]
EVAL = EvalConfig(lengths=(32, 80, 128), max_windows_per_doc=1)  # two past the context: dynamic NTK must not carry over
SESSIONS = {  # token -> (PI, quantizer): every tab wants something else of the same model
    "tab-linear": (PIConfig("linear", 2.0), QuantConfig(method="rtn", bits=3, group_size=32)),
    "tab-yarn": (PIConfig("yarn", 4.0), QuantConfig(method="rtn", bits=4, group_size=16)),
    "tab-dynamic": (PIConfig("dynamic", 2.0), QuantConfig(method="rtn", bits=2, group_size=64)),
    "tab-plain": (PIConfig(), QuantConfig(method="none")),
}


class Overlap:
    """Counts how many of something run at once; `peak` must stay 1."""

    def __init__(self):
        self.live = self.peak = self.count = 0
        self._lock = threading.Lock()

    def enter(self, *a, **k):
        with self._lock:
            self.live += 1
            self.count += 1
            self.peak = max(self.peak, self.live)

    def leave(self, *a, **k):
        with self._lock:
            self.live -= 1


def reference(path) -> dict[str, list[float]]:
    """Each session's numbers computed alone, one after another, on a fresh model."""
    out = {}
    for token, (pi, q) in SESSIONS.items():
        wb = Workbench.open(path, device="cpu", dtype="fp32")
        wb.set_pi(pi)
        wb.set_quant(q)
        out[token] = wb.perplexity(DOCS, EVAL).sort_values(["variant", "doc", "length"]).nll.tolist()
    return out


def test_concurrent_sessions_keep_their_settings_and_results_and_gpu_work_is_serialized(tmp_path):
    path = save_tiny(tmp_path / "m")
    ref = reference(path)
    shared = Workbench.open(path, device="cpu", dtype="fp32")  # one model for every tab, as in the app
    forwards, jobs = Overlap(), Overlap()
    decoder = shared.model.model
    decoder.register_forward_pre_hook(forwards.enter)
    decoder.register_forward_hook(forwards.leave)
    backend = Backend(queue=JobQueue(), models=ModelCache(opener=lambda key: shared))
    key = ModelKey(path, "cpu", "fp32")
    submitted: dict[str, list] = {t: [] for t in SESSIONS}
    start = threading.Barrier(len(SESSIONS))

    def counted(fn):
        def run(progress, cancel):
            jobs.enter()
            try:
                return fn(progress, cancel)
            finally:
                jobs.leave()
        return run

    def tab(token):
        rec = backend.registry.session(token)
        pi, q = SESSIONS[token]
        start.wait()
        for round_ in range(2):
            rec.recipe = Recipe(pi=pi, quant=q)
            rec.settings.update({"round": round_, "owner": token})
            fn = counted(perplexity_job(backend, key, rec.recipe, DOCS, EVAL))
            submitted[token].append(backend.submit(rec, "perplexity", fn, meta={"owner": token}))
            time.sleep(0.001)

    threads = [threading.Thread(target=tab, args=(t,)) for t in SESSIONS]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    backend.queue.wait_idle(300)
    backend.queue.shutdown()

    assert jobs.peak == 1 and jobs.count == 2 * len(SESSIONS)
    assert forwards.peak == 1 and forwards.count > 0
    for token, (pi, q) in SESSIONS.items():
        rec = backend.registry.session(token)
        assert rec.settings == {"round": 1, "owner": token} and rec.recipe == Recipe(pi=pi, quant=q)
        assert rec.jobs["perplexity"] is submitted[token][-1]
        for job in submitted[token]:
            assert job.status == DONE and job.owner == token, job.error
            assert job.result.settings["pi"] == pi.to_dict() and job.result.settings["quant"] == q.to_dict()
            got = job.result.table.sort_values(["variant", "doc", "length"]).nll.tolist()
            assert got == ref[token], token  # bit for bit what the session gets alone
        assert [j.id for j in backend.queue.jobs(owner=token)] == [j.id for j in submitted[token]]


# ----------------------------------------------------------------------------- three browsers, one server


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for_port(port: int, proc, timeout: float) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        assert proc.poll() is None, proc.stderr.read().decode()[-2000:]
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
            return
        except OSError:
            time.sleep(0.2)
    raise TimeoutError(f"the dashboard did not listen on 127.0.0.1:{port} within {timeout} s")


def listen_addresses(port: int) -> set[str]:
    """Local addresses with a listening socket on `port` (from /proc/net/tcp{,6})."""
    out = set()
    for name in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            lines = Path(name).read_text().splitlines()[1:]
        except OSError:
            continue
        for line in lines:
            local, state = line.split()[1], line.split()[3]
            addr, p = local.split(":")
            if state == "0A" and int(p, 16) == port:  # 0A = LISTEN
                out.add(addr)
    return out


CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"


@pytest.mark.browser
@pytest.mark.timeout(240)
def test_three_browser_tabs_on_the_local_dashboard_keep_their_own_settings(tmp_path):
    pytest.importorskip("playwright")
    if not os.path.exists(CHROMIUM):
        pytest.skip("Chromium not installed")
    from playwright.sync_api import sync_playwright

    port = free_port()
    env = {**os.environ, "QROAR_CACHE": str(tmp_path / "cache")}
    server = subprocess.Popen(  # the project's own .streamlit/config.toml decides the address
        [sys.executable, "-m", "streamlit", "run", "app/main.py", "--server.port", str(port)],
        cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        wait_for_port(port, server, 90)
        addrs = listen_addresses(port)
        assert addrs and addrs <= {"0100007F"}, addrs  # 127.0.0.1 only, nothing on 0.0.0.0 or ::
        factors = {0: "3", 1: "5", 2: "7"}
        with sync_playwright() as p:
            browser = p.chromium.launch(executable_path=CHROMIUM, headless=True,
                                        args=["--no-sandbox", "--disable-gpu", "--disable-background-networking"])
            pages = [browser.new_context().new_page() for _ in factors]
            for page in pages:
                page.set_default_timeout(60_000)
                page.goto(f"http://127.0.0.1:{port}/")
            for page in pages:
                page.get_by_role("heading", name="Setup").wait_for()
            tokens = []
            for i, page in enumerate(pages):  # each tab sets its own PI factor
                box = page.get_by_role("spinbutton", name="Factor", exact=True)
                box.fill(factors[i])
                box.press("Enter")
                page.wait_for_url("**?s=*")
                tokens.append(page.url.split("s=")[1].split("&")[0])
            assert len(set(tokens)) == 3
            time.sleep(2)  # let each rerun reach the server
            for i, page in enumerate(pages):  # a reload of the same address shows this tab's value, not another's
                page.goto(f"http://127.0.0.1:{port}/setup?s={tokens[i]}")
                page.get_by_role("heading", name="Setup").wait_for()
                page.wait_for_function("v => document.querySelector('input[aria-label=\"Factor\"]')?.value === v",
                                       arg=factors[i])
            browser.close()
        assert server.poll() is None  # still serving
    finally:
        server.terminate()
        try:
            server.wait(10)
        except subprocess.TimeoutExpired:
            server.kill()
            server.wait()
