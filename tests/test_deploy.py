"""The deployment files in docker/ and docs/DEPLOY.md, checked as far as a machine without
Docker or a cluster can check them, for real: the compose files against the compose
specification's JSON schema, the manifests against Kubernetes' own schemas, every `hpo`
command line in them through the real CLI's parser, every variable they set against those
the project reads, and the GPU lock of docker/one_gpu.py with real processes.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import subprocess
import sys
from collections.abc import Iterator
from importlib.metadata import metadata
from importlib.resources import files
from pathlib import Path

import jsonschema
import kubernetes_validate
import pytest
import torch
import typer.main
import yaml
from kubernetes_validate.utils import all_versions

from search.cli import app
from storage import backend_of

ROOT = Path(__file__).resolve().parents[1]
DOCKER = ROOT / "docker"
K8S = DOCKER / "k8s"
SLURM_SCRIPT = DOCKER / "slurm" / "worker.sbatch"
DEPLOY_DOC = ROOT / "docs" / "DEPLOY.md"
PROJECT_PACKAGES = ("model", "data", "storage", "search")
IMAGE = f"backbone-hpo:{metadata('backbone-hpo')['Version']}"
PLACEHOLDER = "placeholder"
CLI = typer.main.get_command(app)
# The only variables our containers set that the project does not read, and who reads them.
NOT_THE_PROJECTS = {"PATH": "the shell, to find the venv's hpo", "PYTHONUNBUFFERED": "Python"}
# What the official postgres image's entrypoint reads.
POSTGRES_IMAGE_VARIABLES = {"POSTGRES_USER", "POSTGRES_PASSWORD", "POSTGRES_DB", "PGDATA"}
EVERY_COMMAND_A_CLUSTER_RUNS = {"create", "download", "worker", "dashboard"}


# --- reading the files ---------------------------------------------------------------------


def interpolate(text: str, values: dict[str, str]) -> str:
    """${VAR}, ${VAR:-default}, ${VAR:?error} as compose and envsubst substitute them."""

    def value(match: re.Match) -> str:
        name, op, arg = match.group("name", "op", "arg")
        given = values.get(name, "")
        if op in (":-", "-"):
            return given or arg
        if not given:
            raise KeyError(f"${{{name}}} has no value and no default")
        return given

    pattern = r"\$\{(?P<name>\w+)(?:(?P<op>:?[-?])(?P<arg>[^}]*))?\}"
    return re.sub(pattern, value, text).replace("$$", "$")


def env_example() -> dict[str, str]:
    """docker/env.example's settings, the commented-out optional ones included."""
    lines = (DOCKER / "env.example").read_text().splitlines()
    pairs = (re.fullmatch(r"#? ?([A-Z_]+)=(.*)", line) for line in lines)
    return {m[1]: m[2] for m in pairs if m}


def _raw(name: str) -> str:
    return (DOCKER / name).read_text()


def load_compose(name: str) -> dict:
    values = env_example() | {"POSTGRES_PASSWORD": PLACEHOLDER}
    return yaml.safe_load(interpolate((DOCKER / name).read_text(), values))


def secret_values() -> dict[str, str]:
    text = (K8S / "secret.yaml.tmpl").read_text()
    return yaml.safe_load(interpolate(text, {"POSTGRES_PASSWORD": PLACEHOLDER}))["stringData"]


def manifests() -> list[tuple[str, dict]]:
    """(file name, resource) for every resource in docker/k8s, the Secret template included."""
    found = []
    for path in sorted(K8S.iterdir()):
        text = interpolate(path.read_text(), {"POSTGRES_PASSWORD": PLACEHOLDER})
        found += [(path.name, doc) for doc in yaml.safe_load_all(text) if doc]
    return found


def dockerfile() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) with continuation lines joined and comments dropped."""
    text = (DOCKER / "Dockerfile").read_text()
    lines = [line for line in text.splitlines() if not line.lstrip().startswith("#")]
    joined = re.sub(r"\\\n\s*", " ", "\n".join(lines))
    return [tuple(line.split(None, 1)) for line in joined.splitlines() if line.strip()]


def dockerfile_env() -> dict[str, str]:
    env = {}
    for instruction, args in dockerfile():
        if instruction == "ENV":
            env |= dict(pair.split("=", 1) for pair in shlex.split(args))
    return env


def image_env() -> dict[str, str]:
    """The image's own settings of the project's variables (PATH and the like left out)."""
    return {k: v for k, v in dockerfile_env().items() if k not in NOT_THE_PROJECTS}


def dockerfile_entrypoint() -> list[str]:
    return next(json.loads(args) for op, args in dockerfile() if op == "ENTRYPOINT")


def dockerfile_user() -> int:
    return int(next(args for op, args in dockerfile() if op == "USER").split(":")[0])


# --- command lines -------------------------------------------------------------------------


def shell_commands(script: str) -> Iterator[list[str]]:
    """The simple commands of a shell line, split at && ; | and redirections."""
    lexer = shlex.shlex(script, posix=True, punctuation_chars=True)
    lexer.whitespace_split = True
    command: list[str] = []
    for token in lexer:
        if set(token) <= set("();<>|&"):
            if command:
                yield command
            command = []
        else:
            command.append(token)
    if command:
        yield command


def hpo_arguments(argv: list[str]) -> Iterator[list[str]]:
    """The arguments of every `hpo` that this command runs, through `sh -c` or a wrapper."""
    if argv[:2] in (["sh", "-c"], ["bash", "-c"]):
        for command in shell_commands(argv[2]):
            yield from hpo_arguments(command)
        return
    for i, word in enumerate(argv):
        if word == "hpo" or word.endswith("bin/hpo"):
            yield argv[i + 1 :]
            return


def parse_hpo(args: list[str], env: dict[str, str], where: str) -> str:
    """Parse one `hpo` command line with the real CLI, in `env`; runs nothing."""
    name, *rest = args
    if name not in CLI.commands:
        pytest.fail(
            f"{where}: `hpo {name}` is not a command of the CLI (it has: "
            f"{', '.join(sorted(CLI.commands))})"
        )
    with pytest.MonkeyPatch.context() as patch:
        for variable in [v for v in os.environ if v.startswith("HPO_")]:
            patch.delenv(variable)
        for variable, value in env.items():
            patch.setenv(variable, value)
        try:
            CLI.commands[name].make_context(name, list(rest))
        except Exception as err:  # click's usage errors: name the file and the line
            pytest.fail(f"{where}: hpo {shlex.join(args)}: {err}")
    return name


def variables_the_project_reads() -> set[str]:
    """Every option's environment variable, and every variable the packages look up."""
    names = set()
    for command in CLI.commands.values():
        for param in command.params:
            envvar = param.envvar or []
            names |= {envvar} if isinstance(envvar, str) else set(envvar)
    lookup = re.compile(r"""(?:environ\.get\(|environ\[|getenv\()\s*["'](\w+)["']""")
    for package in PROJECT_PACKAGES:
        for path in (ROOT / package).rglob("*.py"):
            names |= set(lookup.findall(path.read_text()))
    return names


def test_the_project_reads_the_variables_the_deploy_files_rely_on() -> None:
    assert {"HPO_STORAGE", "HPO_DATA_DIR", "HPO_ARTIFACT_DIR", "CUDA_VISIBLE_DEVICES"} <= (
        variables_the_project_reads()
    )


# --- Dockerfile ----------------------------------------------------------------------------


def test_dockerfile_installs_the_project_as_the_readme_does() -> None:
    # The line CI runs as the README's install command.
    readme = (ROOT / "README.md").read_text()
    readme_install = re.search(r"^python3 -m venv.*$", readme, re.M)[0]
    run = next(args for op, args in dockerfile() if op == "RUN" and "-m venv" in args)
    image_install = re.sub(r"^(--\S+\s+)*", "", run)  # RUN's own flags (a cache mount)

    def same_modulo_extras(command: str) -> str:
        # The image's one addition: a venv that sees the base image's CUDA torch.
        command = command.replace(" --system-site-packages", "")
        return re.sub(r'"\.\[[^]]*\]"', '".[EXTRAS]"', command)

    assert same_modulo_extras(image_install) == same_modulo_extras(readme_install)
    extras = set(re.search(r'"\.\[([^]]*)\]"', image_install)[1].split(","))
    assert "postgres" in extras  # the storage URL of compose and k8s needs psycopg
    assert extras <= set(metadata("backbone-hpo").get_all("Provides-Extra"))


def test_dockerfile_runs_hpo_as_a_user_on_a_cuda_pytorch_base() -> None:
    instructions = dockerfile()
    base = next(args for op, args in instructions if op == "ARG" and args.startswith("BASE="))
    assert base.startswith("BASE=pytorch/pytorch:") and "cuda" in base
    assert dockerfile_user() > 0
    assert dockerfile_entrypoint() == ["hpo"]
    assert dockerfile_env()["HPO_DATA_DIR"] == "/data"
    assert set(dockerfile_env()) <= variables_the_project_reads() | set(NOT_THE_PROJECTS)


def dockerignored(path: str, patterns: list[str]) -> bool:
    """Docker's rule: the last pattern matching the path or a folder above it decides."""

    def regex(pattern: str) -> re.Pattern:
        parts = re.split(r"(\*\*/|\*\*|\*|\?)", pattern.strip("/"))
        wild = {"**/": "(?:.*/)?", "**": ".*", "*": "[^/]*", "?": "[^/]"}
        return re.compile("".join(wild.get(part, re.escape(part)) for part in parts))

    ignored = False
    prefixes = ["/".join(path.split("/")[: i + 1]) for i in range(path.count("/") + 1)]
    for pattern in patterns:
        keep = pattern.startswith("!")
        if any(regex(pattern.lstrip("!")).fullmatch(prefix) for prefix in prefixes):
            ignored = not keep
    return ignored


def test_dockerignore_keeps_secrets_and_local_state_out_of_the_image() -> None:
    lines = (ROOT / ".dockerignore").read_text().splitlines()
    patterns = [line.strip() for line in lines if line.strip() and not line.startswith("#")]
    for path in ("docker/.env", ".venv/bin/python", ".git/HEAD", "hpo.db", "search/__pycache__/x"):
        assert dockerignored(path, patterns), path
    needed = ["pyproject.toml", "README.md", "docker/one_gpu.py"]
    needed += [
        str(p.relative_to(ROOT)) for pkg in PROJECT_PACKAGES for p in (ROOT / pkg).glob("*.py")
    ]
    assert not [path for path in needed if dockerignored(path, patterns)]


def test_the_env_file_with_the_password_is_ignored_by_git() -> None:
    ignored = subprocess.run(["git", "check-ignore", "-q", "docker/.env"], cwd=ROOT)
    assert ignored.returncode == 0


# --- compose -------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["compose.yaml", "compose.multihost.yaml"])
def test_compose_file_matches_the_compose_specification(name: str) -> None:
    # check-jsonschema vendors the compose-spec project's schema (Apache-2.0).
    vendored = files("check_jsonschema") / "builtin_schemas" / "vendor" / "compose-spec.json"
    schema = json.loads(vendored.read_text())
    validator = jsonschema.validators.validator_for(schema)(schema)
    errors = [
        f"{'/'.join(map(str, error.absolute_path))}: {error.message}"
        for error in validator.iter_errors(load_compose(name))
    ]
    assert not errors, "\n".join(errors)


def test_every_variable_compose_substitutes_is_in_env_example() -> None:
    for name in ("compose.yaml", "compose.multihost.yaml"):
        used = set(re.findall(r"\$\{(\w+)", (DOCKER / name).read_text()))
        assert used <= set(env_example()), name


def hpo_services(compose: dict) -> dict[str, dict]:
    return {name: s for name, s in compose["services"].items() if s.get("image") == IMAGE}


def test_compose_runs_every_hpo_command_line_the_cli_accepts() -> None:
    compose = load_compose("compose.yaml")
    parsed = set()
    for name, service in hpo_services(compose).items():
        env = image_env() | service.get("environment", {})
        argv = service.get("entrypoint", dockerfile_entrypoint()) + service.get("command", [])
        for args in hpo_arguments(argv):
            parsed.add(parse_hpo(args, env, f"compose.yaml, service {name}"))
        assert backend_of(env["HPO_STORAGE"]) == "postgresql"
        assert f"hpo:{PLACEHOLDER}@" in env["HPO_STORAGE"]  # the password is substituted
    assert parsed == EVERY_COMMAND_A_CLUSTER_RUNS


def test_compose_sets_only_variables_their_programs_read() -> None:
    compose = load_compose("compose.yaml")
    for name, service in compose["services"].items():
        readers = POSTGRES_IMAGE_VARIABLES if name == "postgres" else variables_the_project_reads()
        assert set(service.get("environment", {})) <= readers, name


def test_compose_stack_has_what_the_issue_asks_for() -> None:
    compose = load_compose("compose.yaml")
    services = compose["services"]
    postgres, init = services["postgres"], services["init"]
    worker, dashboard = services["worker"], services["dashboard"]
    assert set(services) == {"postgres", "init", "worker", "dashboard"}
    assert set(hpo_services(compose)) == {"init", "worker", "dashboard"}
    # postgres: a volume, a health check, and the password only from the env file
    assert postgres["env_file"] == ".env" and "POSTGRES_PASSWORD" not in postgres["environment"]
    assert "POSTGRES_PASSWORD" not in re.sub(r"\$\{[^}]*\}|#.*", "", _raw("compose.yaml"))
    assert any(v.endswith(":/var/lib/postgresql/data") for v in postgres["volumes"])
    assert "pg_isready" in postgres["healthcheck"]["test"]
    # init and the rest wait for the database, the workers and dashboard for init
    assert init["depends_on"]["postgres"]["condition"] == "service_healthy"
    for service in (worker, dashboard):
        assert service["depends_on"]["init"]["condition"] == "service_completed_successfully"
    # workers: GPUs through the device reservation, one each through one_gpu.py's locks
    (device,) = worker["deploy"]["resources"]["reservations"]["devices"]
    assert device["driver"] == "nvidia" and "gpu" in device["capabilities"]
    assert worker["entrypoint"][0] == "one-gpu"
    assert "docker/one_gpu.py /usr/local/bin/one-gpu" in _raw("Dockerfile")
    assert f"gpu-locks:{_one_gpu().LOCK_DIR}" in worker["volumes"]
    assert worker["restart"] == "on-failure"
    # every hpo container reads CIFAR-10 and checkpoints from volumes they share
    for service in hpo_services(compose).values():
        folders = {dockerfile_env()["HPO_DATA_DIR"], service["environment"]["HPO_ARTIFACT_DIR"]}
        assert folders <= {volume.split(":")[1] for volume in service["volumes"]}
    # the dashboard on all of the container's interfaces, published on this machine only
    assert dashboard["ports"] == ["127.0.0.1:8080:8080"]
    assert dashboard["command"][1:3] == ["--host", "0.0.0.0"]


# --- Kubernetes ----------------------------------------------------------------------------


def test_manifests_match_the_kubernetes_schemas() -> None:
    # The oldest and newest Kubernetes whose schemas kubernetes-validate ships; strict:
    # a misspelt or misplaced field fails too.
    versions = sorted({all_versions()[0], all_versions()[-1]})
    errors = []
    for name, resource in manifests():
        for version in versions:
            try:
                kubernetes_validate.validate(resource, version, strict=True)
            except kubernetes_validate.ValidationError as err:
                path = ".".join(map(str, err.path))
                errors.append(f"{name} {resource['kind']} (k8s {version}): {path}: {err.message}")
    assert not errors, "\n".join(errors)
    kinds = sorted(resource["kind"] for _, resource in manifests())
    assert kinds == sorted(
        [
            "Secret",
            "Service",
            "StatefulSet",
            "PersistentVolumeClaim",
            "Job",
            "Deployment",
            "Service",
        ]
    )


def pod_specs() -> Iterator[tuple[str, dict]]:
    for name, resource in manifests():
        if resource["kind"] in ("Job", "Deployment", "StatefulSet"):
            yield f"{name} {resource['kind']}", resource["spec"]["template"]["spec"]


def containers(pod: dict) -> list[dict]:
    return pod.get("initContainers", []) + pod["containers"]


def container_env(container: dict) -> dict[str, str]:
    env = {}
    for variable in container.get("env", []):
        if "valueFrom" in variable:
            ref = variable["valueFrom"]["secretKeyRef"]
            assert ref["name"] == "hpo-db", ref
            env[variable["name"]] = secret_values()[ref["key"]]
        else:
            env[variable["name"]] = variable["value"]
    return env


def test_manifests_run_every_hpo_command_line_the_cli_accepts() -> None:
    parsed = set()
    for where, pod in pod_specs():
        for container in containers(pod):
            if container["image"] != IMAGE:
                continue
            env = image_env() | container_env(container)
            argv = container.get("command", dockerfile_entrypoint()) + container.get("args", [])
            for args in hpo_arguments(argv):
                parsed.add(parse_hpo(args, env, f"{where}, container {container['name']}"))
            assert backend_of(env["HPO_STORAGE"]) == "postgresql"
            assert f"hpo:{PLACEHOLDER}@" in env["HPO_STORAGE"]  # from the Secret
    assert parsed == EVERY_COMMAND_A_CLUSTER_RUNS


def test_manifests_set_only_variables_their_programs_read() -> None:
    for where, pod in pod_specs():
        for container in containers(pod):
            ours = container["image"] == IMAGE
            readers = variables_the_project_reads() if ours else POSTGRES_IMAGE_VARIABLES
            assert set(container_env(container)) <= readers, f"{where} {container['name']}"


def test_manifests_refer_to_each_other_correctly() -> None:
    resources = manifests()
    claims = {r["metadata"]["name"] for _, r in resources if r["kind"] == "PersistentVolumeClaim"}
    pod_labels = [
        r["spec"]["template"]["metadata"]["labels"]
        for _, r in resources
        if r["kind"] in ("Job", "Deployment", "StatefulSet")
    ]
    for _, service in (item for item in resources if item[1]["kind"] == "Service"):
        selector = service["spec"]["selector"].items()
        assert any(selector <= labels.items() for labels in pod_labels), service["metadata"]
    for where, pod in pod_specs():
        for volume in pod.get("volumes", []):
            assert volume["persistentVolumeClaim"]["claimName"] in claims, where
        if where.endswith("Job"):
            assert pod["securityContext"]["runAsUser"] == dockerfile_user()
        for container in containers(pod):
            container_env(container)  # every Secret reference names a key the Secret has
    (job,) = [r for _, r in resources if r["kind"] == "Job"]
    assert job["spec"]["completionMode"] == "Indexed" and job["spec"]["backoffLimit"] > 0
    assert job["spec"]["parallelism"] == job["spec"]["completions"]
    (worker,) = job["spec"]["template"]["spec"]["containers"]
    assert worker["resources"]["limits"] == {"nvidia.com/gpu": 1}
    (dashboard,) = [r for _, r in resources if r["kind"] == "Service" and "dash" in _name(r)]
    assert dashboard["spec"]["type"] == "ClusterIP"


def _name(resource: dict) -> str:
    return resource["metadata"]["name"]


# --- Slurm ---------------------------------------------------------------------------------


def test_slurm_script_is_valid_bash_and_its_hpo_line_parses() -> None:
    checked = subprocess.run(["bash", "-n", str(SLURM_SCRIPT)], capture_output=True, text=True)
    assert checked.returncode == 0, checked.stderr
    text = SLURM_SCRIPT.read_text()
    assert "#SBATCH --gres=gpu:1" in text
    commands = [line for line in text.splitlines() if not line.lstrip().startswith("#")]
    (line,) = [line for line in commands if re.search(r"\bhpo worker\b", line)]
    # What follows the study on sbatch's line goes on to `hpo worker`: each example's parses.
    examples = re.findall(r"^#\s+sbatch .*worker\.sbatch (\S+)(.*)$", text, re.M)
    assert len(examples) >= 2 and line.rstrip().endswith('"$@"'), examples
    for study, options in examples:
        filled = line.replace('"$@"', options).replace('"$study"', study)
        for command in shell_commands(re.sub(r"\$\{?\w+\}?", PLACEHOLDER, filled)):
            for args in hpo_arguments(command):
                assert parse_hpo(args, {}, SLURM_SCRIPT.name) == "worker"
    exported = set(re.findall(r"^\s*export (\w+)=", text, re.M))
    assert exported <= variables_the_project_reads()


# --- docs/DEPLOY.md ------------------------------------------------------------------------


def doc_command_lines() -> Iterator[list[str]]:
    """Each command of the doc's bash blocks, variables and $(...) replaced by a placeholder."""
    for block in re.findall(r"```bash\n(.*?)```", DEPLOY_DOC.read_text(), re.S):
        for line in block.replace("\\\n", " ").splitlines():
            line = re.sub(r"\$\([^)]*\)|\$\{?\w+\}?", PLACEHOLDER, line)
            yield from shell_commands(line)


def doc_hpo_arguments(command: list[str]) -> Iterator[list[str]]:
    if command[:2] == ["docker", "run"]:
        if IMAGE in command and "--entrypoint" not in command:  # the image's entry point: hpo
            yield command[command.index(IMAGE) + 1 :]
        return
    yield from hpo_arguments(command)


def test_every_hpo_command_line_in_the_deploy_doc_parses() -> None:
    parsed = {
        parse_hpo(args, {}, f"DEPLOY.md: {shlex.join(command)}")
        for command in doc_command_lines()
        for args in doc_hpo_arguments(command)
    }
    assert parsed >= EVERY_COMMAND_A_CLUSTER_RUNS | {"start", "status", "best", "train"}


def test_every_file_the_deploy_doc_names_exists() -> None:
    named = set(re.findall(r"\bdocker/[\w./-]*\w", DEPLOY_DOC.read_text()))
    made_by_the_reader = set(re.findall(r"\bcp \S+ (docker/\S+)", DEPLOY_DOC.read_text()))
    named = {path for path in named - made_by_the_reader if "*" not in path}
    assert named and not [path for path in named if not (ROOT / path).exists()]


def test_every_link_within_the_deploy_doc_has_its_heading() -> None:
    text = DEPLOY_DOC.read_text()
    # GitHub's anchors: lower case, punctuation dropped, spaces to hyphens.
    headings = re.findall(r"^#+ (.*)$", text, re.M)
    anchors = {re.sub(r"[^\w\- ]", "", h.lower()).replace(" ", "-") for h in headings}
    links = set(re.findall(r"\]\(#([^)]+)\)", text))
    assert links and links <= anchors


def test_the_deploy_doc_builds_the_image_the_deploy_files_run() -> None:
    text = DEPLOY_DOC.read_text()
    assert f"docker build -f docker/Dockerfile -t {IMAGE} ." in text
    assert f"image: {IMAGE}" in _raw("compose.yaml")
    images = {c["image"] for _, pod in pod_specs() for c in containers(pod)}
    assert images == {IMAGE, "postgres:17"}


# --- docker/one_gpu.py ---------------------------------------------------------------------


def _one_gpu():
    sys.path.insert(0, str(DOCKER))
    try:
        import one_gpu
    finally:
        sys.path.remove(str(DOCKER))
    return one_gpu


# A replica: claim one of two GPUs, say which, then exec a command that holds the lock.
REPLICA = """
import os, sys
from pathlib import Path
sys.path.insert(0, sys.argv[1])
from one_gpu import claim
print(claim(Path(sys.argv[2]), 2), flush=True)
os.execvp("sleep", ["sleep", "60"])
"""


def test_one_gpu_gives_each_replica_its_own_gpu_until_it_exits(tmp_path: Path) -> None:
    replicas: list[subprocess.Popen] = []

    def start_replica() -> str:
        replica = subprocess.Popen(
            [sys.executable, "-c", REPLICA, str(DOCKER), str(tmp_path)],
            stdout=subprocess.PIPE,
            text=True,
        )
        replicas.append(replica)
        return replica.stdout.readline().strip()

    try:
        assert [start_replica() for _ in range(3)] == ["0", "1", "None"]
        replicas[0].kill()  # the container of GPU 0 stops: its lock goes with it
        replicas[0].wait()
        assert start_replica() == "0"
    finally:
        for replica in replicas:
            replica.kill()
            replica.wait()


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message on a machine with no GPU")
def test_one_gpu_refuses_to_start_without_a_gpu() -> None:
    ran = subprocess.run(
        [sys.executable, str(DOCKER / "one_gpu.py"), "true"], capture_output=True, text=True
    )
    assert ran.returncode == 1 and "no GPU is visible" in ran.stderr


# --- docker/smoke.sh: the compose stack with podman -----------------------------------------

SMOKE_SCRIPT = DOCKER / "smoke.sh"
SMOKE = DOCKER / "smoke"


def podman_compose() -> str:
    """The dev install's podman-compose: CI must have it, elsewhere its absence skips."""
    found = Path(sys.executable).with_name("podman-compose")
    if found.exists():
        return str(found)
    if os.environ.get("CI"):
        pytest.fail("podman-compose is missing from the venv (pyproject's dev extras have it)")
    pytest.skip("podman-compose is not installed (pip install -e '.[dev]')")


def smoke_settings() -> dict[str, str]:
    lines = (SMOKE / "env").read_text().splitlines()
    pairs = (re.fullmatch(r"([A-Z_]+)=(.*)", line) for line in lines)
    return {m[1]: m[2] for m in pairs if m}


def compose_config(tmp_path: Path, settings: dict[str, str], *files: Path) -> dict:
    """The stack as podman-compose resolves it with `settings` as its env file (runs no
    podman); a developer's docker/.env is not read."""
    env_file = tmp_path / f"{len(list(tmp_path.iterdir()))}.env"
    env_file.write_text("".join(f"{name}={value}\n" for name, value in settings.items()))
    names = [arg for path in files for arg in ("-f", str(path))]
    done = subprocess.run(
        [podman_compose(), "--dry-run", "--env-file", str(env_file), "-p", "hpo-smoke", *names,
         "config"],
        capture_output=True,
        text=True,
        check=False,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-2000:]
    return yaml.safe_load(done.stdout)


def test_podman_compose_runs_the_compose_file_with_the_smoke_settings(tmp_path: Path) -> None:
    settings = smoke_settings() | {"POSTGRES_PASSWORD": PLACEHOLDER}
    override = SMOKE / "compose.override.yaml"
    smoke = compose_config(tmp_path, settings, DOCKER / "compose.yaml", override)
    real = compose_config(tmp_path, {"POSTGRES_PASSWORD": PLACEHOLDER}, DOCKER / "compose.yaml")
    # Only the image of postgres is swapped; everything else of the file is as it runs anywhere.
    smoke_db, real_db = smoke["services"]["postgres"], real["services"]["postgres"]
    assert smoke_db["image"] == settings["POSTGRES_IMAGE"] and real_db["image"] == "postgres:17"
    assert {k: v for k, v in smoke_db.items() if k != "image"} == {
        k: v for k, v in real_db.items() if k != "image"
    }
    for name in ("init", "worker", "dashboard"):
        assert smoke["services"][name]["depends_on"] == real["services"][name]["depends_on"]
    assert smoke["volumes"] == real["volumes"]
    # init creates the tiny synthetic study and downloads nothing; with the defaults, CIFAR-10
    (smoke_init,) = smoke["services"]["init"]["command"]
    (real_init,) = real["services"]["init"]["command"]
    assert "--space tiny --dataset synthetic" in smoke_init
    assert "--space default --dataset cifar10" in real_init
    assert real_init.endswith("if [ cifar10 = cifar10 ]; then hpo download; fi")
    assert smoke_init.endswith("if [ synthetic = cifar10 ]; then hpo download; fi")
    # The smoke's workers: no GPU reservation (podman refuses it without NVIDIA's CDI spec),
    # and two GPU slots for one-gpu to share out; the real file keeps the reservation.
    smoke_worker, real_worker = smoke["services"]["worker"], real["services"]["worker"]
    assert "deploy" not in smoke_worker and smoke_worker["environment"]["ONE_GPU_COUNT"] == "2"
    (device,) = real_worker["deploy"]["resources"]["reservations"]["devices"]
    assert device == {"driver": "nvidia", "count": "all", "capabilities": ["gpu"]}
    rest = ("deploy", "environment", "command")
    assert {k: v for k, v in smoke_worker.items() if k not in rest} == {
        k: v for k, v in real_worker.items() if k not in rest
    }


def test_the_smoke_settings_are_ones_the_cli_accepts() -> None:
    compose = yaml.safe_load(
        interpolate(_raw("compose.yaml"), smoke_settings() | {"POSTGRES_PASSWORD": PLACEHOLDER})
    )
    env = compose["services"]["init"]["environment"]
    commands = [args for argv in [["sh", "-c", *compose["services"]["init"]["command"]]]
                for args in hpo_arguments(argv)]  # fmt: skip
    assert [parse_hpo(args, env, "smoke init") for args in commands] == ["create", "download"]


@pytest.mark.smoke
@pytest.mark.timeout(1800)
def test_the_compose_stack_runs_for_real_with_podman() -> None:
    if not shutil.which("podman"):
        pytest.skip("podman is not installed (apt-get install podman runc mmdebstrap uidmap)")
    if os.geteuid() != 0:
        pytest.skip("docker/smoke.sh runs podman as root")
    done = subprocess.run(
        ["bash", str(SMOKE_SCRIPT)],
        capture_output=True,
        text=True,
        env={**os.environ, "PODMAN_COMPOSE": podman_compose()},
        check=False,
    )
    print(done.stdout[-5000:], done.stderr[-3000:])
    assert done.returncode == 0
    assert "passed, stack removed" in done.stdout
