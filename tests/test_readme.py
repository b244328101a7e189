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
