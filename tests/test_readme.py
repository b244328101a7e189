"""The README's command examples stay true: every `qroar` line of its bash blocks parses with the real CLI."""

import re
import shlex
from pathlib import Path

import pytest

from qroar.cli import build_parser

README = Path(__file__).resolve().parent.parent / "README.md"


def readme_commands() -> list[str]:
    blocks = re.findall(r"```bash\n(.*?)```", README.read_text(), re.S)
    lines = [ln for b in blocks for ln in b.replace("\\\n", " ").splitlines()]
    return [ln.split("#", 1)[0].strip() for ln in lines if ln.strip().startswith(("qroar ", "qroar-figures "))]


def test_the_readme_has_command_examples():
    cmds = readme_commands()
    assert any(c.startswith("qroar eval") for c in cmds) and any(c.startswith("qroar export") for c in cmds)


@pytest.mark.parametrize("cmd", readme_commands())
def test_readme_command_parses(cmd):
    argv = shlex.split(re.sub(r"\[([^\]]*)\]", r"\1", cmd))  # an optional [--flag] is shown with its brackets
    if argv[0] == "qroar-figures":
        from app.figures_cli import main

        with pytest.raises(SystemExit) as e:  # --help parses the same parser without running anything
            main(["--help"])
        assert e.value.code == 0 and len(argv) >= 2
        return
    build_parser().parse_args(argv[1:])  # SystemExit (a failure) on an unknown flag such as the old --folder


def as_written(cmd: str) -> list[list[str]]:
    """The argv lists a README line stands for: without its optional [--flags], then with them (once more)."""
    bare = shlex.split(re.sub(r"\[[^\]]*\]", "", cmd))
    full = shlex.split(re.sub(r"\[([^\]]*)\]", r"\1", cmd))
    return [bare] if bare == full else [bare, full]


@pytest.mark.timeout(1200)
def test_readme_examples_run_as_written_in_under_a_minute_each(tmp_path):
    """Every command of the README, in its order, as the installed console scripts in a fresh folder (the
    later ones read what the earlier ones wrote), each under a minute on 2 CPU cores (asserted with room:
    300 s, for slower or busier machines: it catches a default that runs for hours); prints the time of each."""
    import os
    import subprocess
    import sys
    import time

    bindir = Path(sys.executable).parent
    env = {**os.environ, "PATH": f"{bindir}{os.pathsep}{os.environ.get('PATH', '')}", "HF_HUB_OFFLINE": "1"}
    times = []
    for cmd in readme_commands():
        for argv in as_written(cmd):
            t = time.perf_counter()
            r = subprocess.run(argv, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
            times.append((" ".join(argv), time.perf_counter() - t))
            assert r.returncode == 0, f"{' '.join(argv)} failed ({r.returncode}):\n{r.stderr[-3000:]}"
    print("\n".join(f"{s:6.1f} s  {c}" for c, s in times))
    for c, s in times:  # a minute or less when measured (README); the bound leaves room for a slower machine
        assert s < 300, f"{c} took {s:.0f} s"
    assert (tmp_path / "results" / "scales.json").is_file() and (tmp_path / "results" / "ckpt" / "config.json").is_file()
