"""The MLflow UI and Optuna's dashboard: the saved views written to a study's experiment (views)
and the servers `runner.py ui` / `dashboard` start (serve). Above tracking: tracking never
imports it."""
