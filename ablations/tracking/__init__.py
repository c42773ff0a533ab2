"""Tracking: every read and write of the MLflow store (tracker writes runs, reads reads them back
for the results, stored_runs reads an SQLite store's tables directly), the retry loop shared with
the Optuna storage, and the MLflow UI's own views (ui/). Nothing here imports ui/."""
