"""The Streamlit dashboard: shell (main.py), shared state, bound widgets, chart builders and the job queue."""
