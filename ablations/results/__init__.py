"""The results: effects with confidence intervals, rates, stability, verdicts, power, and the
report. Computes only: reads runs through ablations.tracking.reads and never writes to MLflow
(the runner attaches a report through the tracker); never imports the engine."""
