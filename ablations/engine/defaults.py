"""Default store URLs, in a module that imports nothing: the command line's help and argument
errors need them without loading Optuna, MLflow or torch."""

DEFAULT_STORAGE = "sqlite:///optuna.db"
DEFAULT_TRACKING = "sqlite:///mlflow.db"  # MLflow's own default store
STORAGE_ENV = "CHORUS_STORAGE"  # the Optuna storage URL when --storage is not given
