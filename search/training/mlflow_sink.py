"""MLflow: an experiment per study, one parent run for the study, and under it one run per
retry chain (tag mlflow.parentRunId) with the trial's parameters, every epoch's metrics (step =
epoch), tags (trial, state, host, GPU, space) and an end status: FINISHED, KILLED (pruned) or
FAILED. The chain's run id is stored on its trial, which its retries inherit.

Every write here may be a repeat of one whose answer was lost: a run is found by its tags
before one is created, a metric is sent with the time it was taken (MLflow keeps one point
per key, step, time and value), and a resumed chain sends only the steps its run lacks.
"""

from __future__ import annotations

from contextlib import suppress

import optuna
from optuna.trial import FrozenTrial

from search.rules import attrs
from search.rules.trackers import bound_mlflow_http, chain_number, mlflow_run_url
from search.training.tracker_chain import Chain, final_metrics, scalars

bound_mlflow_http()  # before MLflow reads its environment
from mlflow import MlflowClient  # noqa: E402
from mlflow.entities import Metric, Param, RunTag  # noqa: E402
from mlflow.exceptions import MlflowException  # noqa: E402

STATUS = {"complete": "FINISHED", "pruned": "KILLED", "failed": "FAILED"}
KIND, CHAIN = "hpo.kind", "hpo.chain"
# MLflow 3's UI opens an experiment of this kind on its model-training pages (runs, charts),
# not on the GenAI ones it guesses for an experiment without the tag.
EXPERIMENT_TAGS = {"mlflow.experimentKind": "custom_model_development"}
BATCH = 100  # MLflow's most params (and tags) in one log_batch


class MlflowSink:
    name = "mlflow"

    def __init__(self, uri: str, study: str) -> None:
        self.uri, self.study = uri, study
        self.client = MlflowClient(tracking_uri=uri)
        self.experiment_id: str | None = None
        self.parent: str | None = None
        self.parent_open = False  # seen running (or made so) by this worker
        self.runs: dict[int, str] = {}  # chain -> run id
        self.logged: dict[int, set[int]] = {}  # chain -> steps its run held when resumed

    def started(self, chain: Chain) -> None:
        study = chain.trial.study
        run_id = self._chain_run(study, chain)
        self.client.update_run(run_id, status="RUNNING")
        params = [Param(key, str(value)) for key, value in chain.params.items()]
        for start in range(0, len(params), BATCH):
            self.client.log_batch(run_id, params=params[start : start + BATCH])
        tags = {**chain.tags, "hpo.trial": str(chain.trial.number), "hpo.state": "running"}
        self.client.log_batch(run_id, tags=[RunTag(k, v) for k, v in tags.items()])
        if chain.resumed is not None:
            history = self.client.get_metric_history(run_id, "score")
            self.logged[chain.first] = {point.step for point in history}
            for record in chain.resumed:
                self.epoch(chain, record, chain.started_ms)

    def epoch(self, chain: Chain, record: dict, at_ms: int) -> None:
        step = record["epoch"]
        if step in self.logged.get(chain.first, ()):
            return  # its run holds this step from the run before the resume
        metrics = [Metric(name, value, at_ms, step) for name, value in scalars(record).items()]
        self.client.log_batch(self.runs[chain.first], metrics=metrics)

    def ended(self, chain: Chain, state: str) -> None:
        run_id = self.runs[chain.first]
        tags = [RunTag("hpo.state", state), RunTag("hpo.trial", str(chain.trial.number))]
        last = chain.history[-1]["epoch"] if chain.history else 0
        metrics = [
            Metric(name, value, 0, last) for name, value in final_metrics(chain.history).items()
        ]
        self.client.log_batch(run_id, metrics=metrics, tags=tags)
        if state in STATUS:  # interrupted: the retry goes on in this run
            self.client.set_terminated(run_id, STATUS[state])
            self.logged.pop(chain.first, None)

    def study_done(self, study: optuna.Study) -> None:
        """The target met: the study's run ends FINISHED (a chain of a larger target, later,
        opens it again)."""
        parent = study.user_attrs.get(attrs.MLFLOW_PARENT_RUN)
        if parent and self.client.get_run(parent).info.status == "RUNNING":
            self.client.set_terminated(parent, "FINISHED")

    def given_up(self, study: optuna.Study, trial: FrozenTrial) -> None:
        run_id = trial.user_attrs.get(attrs.MLFLOW_RUN) or self._find_chain(
            study, chain_number(trial)
        )
        if run_id is None:
            return
        if self.client.get_run(run_id).info.status != "RUNNING":
            return
        self.client.set_tag(run_id, "hpo.state", "failed")
        self.client.set_terminated(run_id, "FAILED")

    def permanent(self, err: Exception) -> bool:
        if isinstance(err, MlflowException):
            status = err.get_http_status_code()
            return 400 <= status < 500 and status not in (408, 429)
        return not isinstance(err, OSError)  # requests' errors are OSErrors: an outage

    def close(self) -> None:
        pass  # every write is a request of its own

    # --- runs, found before they are made -----------------------------------------------

    def experiment(self, study: optuna.Study) -> str:
        if self.experiment_id is None:
            found = self.client.get_experiment_by_name(self.study)
            if found is None:
                tags = {**EXPERIMENT_TAGS, "hpo.study": self.study}
                with suppress(MlflowException):  # another worker made it first
                    self.client.create_experiment(self.study, tags=tags)
                found = self.client.get_experiment_by_name(self.study)
            self.experiment_id = found.experiment_id
            _set_study_attr(study, attrs.MLFLOW_EXPERIMENT, self.experiment_id)
        return self.experiment_id

    def study_run(self, study: optuna.Study) -> str:
        """The study's parent run: the one the study names, else the earliest one tagged for
        it (workers racing to make one each adopt the earliest), else a new one."""
        if self.parent is None:
            experiment = self.experiment(study)
            self.parent = study.user_attrs.get(attrs.MLFLOW_PARENT_RUN) or self._find(
                experiment, f"tags.`{KIND}` = 'study'"
            )
            if self.parent is None:
                self.client.create_run(
                    experiment, run_name=self.study, tags={KIND: "study", "hpo.study": self.study}
                )
                self.parent = self._find(experiment, f"tags.`{KIND}` = 'study'")
            _set_study_attr(study, attrs.MLFLOW_PARENT_RUN, self.parent)
        return self.parent

    def open_study_run(self, study: optuna.Study) -> str:
        """The study's run, running again if a target met before had ended it."""
        parent = self.study_run(study)
        if not self.parent_open:
            if self.client.get_run(parent).info.status != "RUNNING":
                self.client.update_run(parent, status="RUNNING")
            self.parent_open = True
        return parent

    def _chain_run(self, study: optuna.Study, chain: Chain) -> str:
        run_id = self.runs.get(chain.first) or chain.inherited_run
        run_id = run_id or self._find_chain(study, chain.first)
        if run_id is None:
            parent = self.open_study_run(study)
            tags = {KIND: "trial", CHAIN: str(chain.first), "mlflow.parentRunId": parent}
            created = self.client.create_run(
                self.experiment(study), run_name=f"trial-{chain.first}", tags=tags
            )
            run_id = created.info.run_id
        self.runs[chain.first] = run_id
        if chain.inherited_run != run_id:
            _remember(chain, run_id, self.uri, self.experiment_id)
        return run_id

    def _find_chain(self, study: optuna.Study, first: int) -> str | None:
        where = f"tags.`{KIND}` = 'trial' and tags.`{CHAIN}` = '{first}'"
        return self._find(self.experiment(study), where)

    def _find(self, experiment: str, where: str) -> str | None:
        runs = self.client.search_runs(
            [experiment], where, order_by=["attributes.start_time ASC"], max_results=1
        )
        return runs[0].info.run_id if runs else None


def _remember(chain: Chain, run_id: str, uri: str, experiment_id: str | None) -> None:
    """The run id on the trial (status, report; its retries inherit it) and a link in its
    dashboard note; a trial that ended before its run was made (the server was down) cannot
    take either: the id goes to the study's attrs under the chain's number. Best effort."""
    trial = chain.trial
    try:
        trial.set_user_attr(attrs.MLFLOW_RUN, run_id)
    except Exception:
        _set_study_attr(trial.study, f"{attrs.MLFLOW_CHAIN_RUN}{chain.first}", run_id)
        return
    with suppress(Exception):
        import optuna_dashboard

        link = mlflow_run_url(uri, experiment_id, run_id)
        optuna_dashboard.save_note(trial, f"MLflow run: {link}")


def _set_study_attr(study: optuna.Study, key: str, value: str) -> None:
    with suppress(Exception):
        if study.user_attrs.get(key) != value:
            study.set_user_attr(key, value)
