"""Helpers shared by the AppTest (headless dashboard) tests: start the app, load a model, wait for
the worker, switch pages, and the tiny model folder they load."""

import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from streamlit.testing.v1 import AppTest  # noqa: E402

from app import state  # noqa: E402

MAIN = str(ROOT / "app" / "main.py")
TIMEOUT = 120  # s per script run: two CPU cores shared with other test runs
JOBS = 300  # s for the worker to finish a session's jobs


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory) -> str:
    """A tiny random Llama with a character tokenizer, saved once per test module."""
    from conftest import save_char_tiny

    return save_char_tiny(tmp_path_factory.mktemp("tiny-llama"))


def new_app(query_params=None) -> AppTest:
    at = AppTest.from_file(MAIN, default_timeout=TIMEOUT)
    at.query_params.update(query_params or {})
    return at.run()


def finish(at: AppTest) -> AppTest:
    """Let the worker finish this session's jobs, then rerun the page as the polling fragment would."""
    state.backend().queue.wait_idle(timeout=JOBS)
    return at.run()


def ok(at: AppTest) -> None:
    assert not at.exception, [e.message for e in at.exception]


def button(at: AppTest, label: str):
    return next(b for b in at.button if b.label == label)


def load(at: AppTest, path: str) -> AppTest:
    """Load the model at `path` from Setup and wait until it is loaded."""
    at.selectbox(key="w:model.choice").set_value(state.OTHER_MODEL).run()
    at.text_input(key="w:model.custom").input(path).run()
    button(at, "Load model").click().run()
    return finish(at)


def go(at: AppTest, page: str) -> AppTest:
    return at.switch_page(f"../pages/{page}.py").run()


def record(at: AppTest):
    """This AppTest session's record (settings, jobs) in the process-wide registry."""
    token = at.query_params["s"]
    return state.backend().registry.session(token[0] if isinstance(token, list) else token)


def update(rec, settings: dict) -> None:
    """Put settings on a session record as the widgets would: Recipe paths into its Recipe, the rest as options."""
    from app.state import RECIPE_HEADS, default_recipe

    for k, v in settings.items():
        if k.split(".", 1)[0] in RECIPE_HEADS:
            rec.recipe = (rec.recipe or default_recipe()).set(k, v)
        else:
            rec.settings[k] = v
