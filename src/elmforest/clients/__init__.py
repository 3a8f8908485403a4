"""Clients of the forest that speak other tools' protocols: lm-evaluation-harness (lm_eval.py), an
OpenAI-compatible HTTP server (server.py) and a self-contained HTML run report (report.py). Each needs
an optional extra (`pip install -e ".[eval]"`, `".[serve]"`), imported only where it is used, so the
core install stays lean."""
