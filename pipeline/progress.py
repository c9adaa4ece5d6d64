"""Progress of a long step, for the console (placeholder until the runner listens)."""


def update(text: str) -> None:
    """Say what the step is doing now; costs nothing when nobody listens."""
