"""Dashboard entry: page config, shared state and navigation only; every screen is a page in pages/.

Run with `streamlit run app/main.py`. A new page is one file in pages/ plus one st.Page line below.
"""

import logging
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:  # `streamlit run app/main.py` puts app/ on the path, not the repo root
    sys.path.insert(0, str(ROOT))

import streamlit as st  # noqa: E402

from app import state, widgets  # noqa: E402
from qroar.errors import QroarError  # noqa: E402

st.set_page_config(page_title="Q-ROAR", page_icon=":material/graphic_eq:", layout="wide")
state.session()  # creates or re-attaches this session (?s=<token> in the URL)

PAGES = {
    "Model": [
        st.Page(widgets.page_path("setup"), title="Setup", icon=":material/tune:", url_path="setup", default=True),
    ],
    "Evaluate": [
        st.Page(widgets.page_path("perplexity"), title="Perplexity", icon=":material/show_chart:", url_path="perplexity"),
        st.Page(widgets.page_path("diagnostics"), title="Diagnostics", icon=":material/grid_on:", url_path="diagnostics"),
        st.Page(widgets.page_path("fidelity"), title="Fidelity & retrieval", icon=":material/compare:", url_path="fidelity"),
    ],
    "Q-ROAR": [
        st.Page(widgets.page_path("tune"), title="Tune", icon=":material/tune:", url_path="tune"),
        st.Page(widgets.page_path("search"), title="Search", icon=":material/manage_search:", url_path="search"),
        st.Page(widgets.page_path("export"), title="Export", icon=":material/save:", url_path="export"),
    ],
    "Share": [
        st.Page(widgets.page_path("runs"), title="Runs", icon=":material/compare_arrows:", url_path="runs"),
        st.Page(widgets.page_path("report"), title="Report", icon=":material/description:", url_path="report"),
    ],
    "Learn": [st.Page(widgets.page_path("learn"), title="Learn", icon=":material/school:", url_path="learn")],
}

nav = st.navigation(PAGES)
widgets.sidebar_status()
try:
    nav.run()
except QroarError as e:  # a user-caused problem raised in page code: say it, keep the app up
    st.error(f"{e}")
except Exception as e:  # a bug: show what happened and how to report it, never a bare traceback page
    if type(e).__name__ == "FragmentHandledException":  # Streamlit's own control flow for fragments
        raise
    logging.getLogger("qroar.app").exception("page %s failed", nav.title)
    st.error(f"Unexpected error on this page ({type(e).__name__}: {e}). This is a bug: reload the page to go on, "
             "and please report it with the steps that led here.")
