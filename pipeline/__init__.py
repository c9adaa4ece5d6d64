"""kiln's engine: recipe schema, plan, runner, content-addressed store, MLflow client, CLI.

Nothing in this package imports a machine-learning framework; framework knowledge lives in `stages`.
"""

__version__ = "0.1.0"
