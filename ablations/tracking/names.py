"""Names on the MLflow store that the tracker writes and the UI reads: the experiment kind, where
the report lands, the UI's route to an artifact, the latest launch run. Imports nothing, so the
UI (ablations.tracking.ui) and the tracker share them without the tracker importing the UI."""

from __future__ import annotations

KIND_TAG = "mlflow.experimentKind"  # MLflow 3: "custom_model_development" = model training
TRAINING_KIND = "custom_model_development"
REPORT_PATH = "report/report.md"  # where the report lands among the launch run's artifacts


def artifact_url(experiment_id: str, run_id: str, path: str) -> str:
    """The UI route (hash part) of a run's artifact, opened in the model-training layout (a run
    page without `workflowType` shows the GenAI layout until the user picks one)."""
    return (f"#/experiments/{experiment_id}/runs/{run_id}/artifacts/{path}"
            f"?workflowType=machine_learning")


def latest_launch(client, experiment_id: str, with_report: bool = False):
    """The study's most recent launch run (None if none); `with_report`: the most recent one a
    report was logged to."""
    where = "tags.kind = 'launch'" + (f" and tags.report = '{REPORT_PATH}'" if with_report else "")
    runs = client.search_runs([experiment_id], where, max_results=1,
                              order_by=["attributes.start_time DESC"])
    return runs[0] if runs else None
