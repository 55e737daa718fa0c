"""A database password never reaches a terminal, a log, an exported file or a report: in
every form a URL carries one, through every command and the workers they start."""

from __future__ import annotations

import re
import signal
import subprocess
import uuid
from pathlib import Path
from urllib.parse import quote

import pytest
import yaml
from conftest import HPO, run_hpo, tiny_start
from servers import DATABASE, PASSWORD, server_url

from storage import redact_url

# Forms a URL carries a password in; trust auth (PostgreSQL) ignores it.
POSTGRES_FORMS = {
    "in the user info": f"postgresql+psycopg://postgres:{{pw}}@127.0.0.1:5432/{DATABASE}",
    "as a query parameter": (
        f"postgresql+psycopg://postgres@127.0.0.1:5432/{DATABASE}?password={{pw}}"
    ),
}
# Forms that fail to connect (wrong port, driver not installed, no such server).
FAILING_FORMS = [
    "postgresql+psycopg://postgres:{pw}@127.0.0.1:1/hpo_test",
    "postgresql://postgres:{pw}@127.0.0.1:1/hpo_test",  # psycopg2: not installed
    "mysql+pymysql://root:{pw}@127.0.0.1:1/hpo_test",
    "redis://:{pw}@127.0.0.1:1/0",
    "redis://user:{pw}@127.0.0.1:1/0",
]
# Characters a password may hold; in a URL they are percent-encoded.
ODD_PASSWORD = "p@ss:w/rd%"


def assert_hidden(*texts: str) -> None:
    for text in texts:
        assert PASSWORD not in text, text
        assert ODD_PASSWORD not in text, text
        assert "Traceback" not in text, text


@pytest.mark.slow
def test_no_command_or_worker_prints_the_password(hpo_env: dict, tmp_path: Path) -> None:
    """Both forms reach the same database (trust auth ignores the password): the workers run
    once in one form and the training once in the other, every control-plane command in
    both, on that one study."""
    server_url("postgresql")  # skips (fails in CI) without the server
    user_info, query = (form.format(pw=PASSWORD) for form in POSTGRES_FORMS.values())
    study = f"secret-{uuid.uuid4().hex[:8]}"
    outputs, written = [], []

    def hpo(url: str, *args: str) -> None:
        env = {**hpo_env, "HPO_STORAGE": url, "HPO_ARTIFACT_DIR": str(tmp_path / "artifacts")}
        done = run_hpo(*args, env=env, cwd=tmp_path)
        assert done.returncode == 0, done.stdout + done.stderr
        outputs.extend([done.stdout, done.stderr])

    hpo(user_info, *tiny_start(study, 2, "--jobs-per-gpu", "2"))  # two worker processes, relayed
    for n, url in enumerate((user_info, query)):
        hpo(url, "status", "--study", study)
        hpo(url, "status")
        hpo(url, "best", "--study", study, "-o", f"best{n}.yaml")
        hpo(url, "report", "--study", study, "-o", f"report{n}")
        best = (tmp_path / f"best{n}.yaml").read_text()
        assert yaml.safe_load(best)["source"]["storage"] == redact_url(url)
        written += [best, (tmp_path / f"report{n}/report.html").read_text()]
        env = {**hpo_env, "HPO_STORAGE": url}
        outputs.append(dashboard_banner(env, tmp_path))
    # Attached to the study through HPO_STORAGE (the config's storage has no password).
    hpo(query, "train", "--config", "best1.yaml", "--dataset", "synthetic", "--epochs", "1")
    assert f"to study '{study}'" in outputs[-2], outputs[-2]
    assert_hidden(*outputs, *written)


def dashboard_banner(env: dict, cwd: Path) -> str:
    """What `hpo dashboard` prints before it serves, read up to its banner line."""
    process = subprocess.Popen(
        [HPO, "dashboard", "--port", "0"], env=env, cwd=cwd,
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )  # fmt: skip
    assert process.stdout is not None
    lines = []
    for line in process.stdout:
        lines.append(line)
        if re.search(r"at http://\S+/dashboard", line):
            break
    process.send_signal(signal.SIGINT)
    lines.append(process.communicate(timeout=60)[0])
    assert process.returncode == 0, lines
    return "".join(lines)


@pytest.mark.parametrize("template", FAILING_FORMS)
def test_a_storage_that_fails_names_it_without_the_password(
    template: str, hpo_env: dict, tmp_path: Path
) -> None:
    checks = [(ODD_PASSWORD, ["status"], 2)]
    if template == FAILING_FORMS[0]:  # the paths of the workers, once: they wait, then give up
        wait = ("--storage-retry-s", "1")
        checks += [
            (PASSWORD, ["worker", "--study", "s", *wait], 75),
            (PASSWORD, [*tiny_start("s", 1), *wait], 75),
        ]
    for password, args, code in checks:
        url = template.format(pw=quote(password, safe=""))
        done = run_hpo(*args, env={**hpo_env, "HPO_STORAGE": url}, cwd=tmp_path)
        assert done.returncode == code, done.stdout + done.stderr
        assert done.stderr.startswith("error: ") and done.stderr.count("\n") == 1
        assert_hidden(done.stdout, done.stderr)
        assert quote(password, safe="") not in done.stderr
