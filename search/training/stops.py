"""The exception a trial raises when its worker was asked to stop. Its own module, torch-free,
so the objective that raises it and the worker loop that catches it import it, not each other."""


class TrialInterrupted(Exception):
    """A stop was requested; the trial's last epoch is checkpointed and it should be retried."""
