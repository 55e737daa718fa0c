#!/usr/bin/env bash
# docker/compose.yaml run for real, with podman, on a host with no GPU and no image registry:
#
#   bash docker/smoke.sh        (as root; 2-6 minutes on 2 cores once the images are built)
#
# It builds the images from Debian's packages (a root file system made by mmdebstrap, imported
# as the base of a CPU-torch image and of a PostgreSQL image), brings the stack up with
# `--scale worker=2`, runs a tiny study to its target, opens the dashboard in headless
# Chromium, stops a worker mid-trial and sees the trial resumed from its checkpoint, and takes
# everything down again, on failure too. Needs podman (with runc), podman-compose >= 1.1,
# mmdebstrap and chromium. Images and the root file system stay in $HPO_SMOKE_CACHE
# (default /var/tmp/hpo-smoke) and in podman's storage, so later runs reuse them.
set -euo pipefail

ROOT=$(cd "$(dirname "$0")/.." && pwd)
SMOKE=$ROOT/docker/smoke
CACHE=${HPO_SMOKE_CACHE:-/var/tmp/hpo-smoke}
PROJECT=hpo-smoke
DEBIAN_IMAGE=localhost/hpo-smoke/debian:bookworm
TORCH_IMAGE=localhost/hpo-smoke/torch-cpu:bookworm
HPO_IMAGE=backbone-hpo:$(sed -n 's/^version = "\(.*\)"/\1/p' "$ROOT/pyproject.toml")
# The project's dev install has podman-compose; Debian's (on PATH) is too old on Debian 12.
PODMAN_COMPOSE=${PODMAN_COMPOSE:-$(ls "$ROOT/.venv/bin/podman-compose" 2>/dev/null || command -v podman-compose || true)}
# shellcheck source=smoke/env
source "$SMOKE/env"
started=$SECONDS

say() { printf '[smoke %3ds] %s\n' $((SECONDS - started)) "$*"; }
die() {
    say "FAILED: $*"
    exit 1
}

# Wait for `check` (a command) to succeed, polling every second, at most $1 seconds.
wait_for() {
    local limit=$1
    shift
    for _ in $(seq "$limit"); do
        "$@" >/dev/null 2>&1 && return
        sleep 1
    done
    return 1
}

check_tools() {
    [ "$(id -u)" = 0 ] || die "run as root: rootless podman needs subuid ranges set up"
    for tool in podman runc mmdebstrap chromium; do
        command -v "$tool" >/dev/null || die "$tool is missing (apt-get install $tool)"
    done
    [ -n "$PODMAN_COMPOSE" ] || die "podman-compose is missing (pip install 'podman-compose>=1.1')"
    # 1.0.x (Debian 12's) ignores --scale and every depends_on condition.
    "$PODMAN_COMPOSE" --version 2>/dev/null | grep -qE 'podman-compose version:? *1\.([1-9]|[0-9]{2,})' \
        || die "$PODMAN_COMPOSE is older than 1.1 (pip install 'podman-compose>=1.1')"
    [ ! -e "$ROOT/docker/.env" ] || die "docker/.env exists: move it aside (the smoke writes its own)"
}

# podman 4.3 on this kind of host: its default ulimits exceed what the host allows (runc
# fails on RLIMIT_NOFILE), there is no systemd to manage cgroups, and crun would refuse the
# hybrid cgroup v1 hierarchy.
runtime_config() {
    mkdir -p "$CACHE"
    cat >"$CACHE/containers.conf" <<'EOF'
[containers]
default_ulimits = []
[engine]
cgroup_manager = "cgroupfs"
runtime = "runc"
EOF
    export CONTAINERS_CONF=$CACHE/containers.conf
}

# Debian 12 with Python, a C compiler (torch.compile's) and PostgreSQL, from this host's apt
# sources, imported as an image. Both base images below start from it.
debian_image() {
    podman image exists "$DEBIAN_IMAGE" && return
    local tarball=$CACHE/debian-bookworm.tar
    if [ ! -f "$tarball" ]; then
        say "mmdebstrap: Debian bookworm root file system"
        local sources=(/etc/apt/sources.list.d/*.sources)
        [ -e "${sources[0]}" ] || sources=(/etc/apt/sources.list)
        local options=()
        for conf in /etc/apt/apt.conf.d/*; do options+=("--aptopt=$conf"); done
        mmdebstrap --quiet --variant=apt --format=tar "${options[@]}" \
            --include=ca-certificates,python3,python3-venv,python3-pip,gcc,libc6-dev,postgresql \
            bookworm "$tarball.part" "${sources[@]}"
        mv "$tarball.part" "$tarball"
    fi
    podman import --quiet "$tarball" "$DEBIAN_IMAGE" >/dev/null
}

# This host's pip settings (config files and PIP_* variables, merged as pip reads them) as one
# pip.conf, and read-only mounts of it and of every local path it names (wheel folders, file://
# indexes, CA bundle, constraints), so that pip in a build resolves as pip here does.
pip_mounts() {
    python3 - "$CACHE/pip.conf" <<'EOF'
import os, subprocess, sys
from pathlib import Path

listed = subprocess.run(["pip", "config", "list"], capture_output=True, text=True).stdout
settings = {}
for line in sorted(listed.splitlines(), key=lambda line: line.startswith(":env:")):
    key, _, value = line.partition("=")
    settings[key.split(".", 1)[1]] = value.strip("'\"")
Path(sys.argv[1]).write_text("[global]\n" + "".join(f"{k} = {v}\n" for k, v in settings.items()))
mounts = {sys.argv[1]: "/etc/pip.conf"}
for value in settings.values():
    for word in value.split():
        path = word.removeprefix("file://")
        if path.startswith("/") and os.path.exists(path):
            # A file:// index links its files relative to itself: mount the folder above.
            path = os.path.dirname(path.rstrip("/")) if word.startswith("file://") else path
            mounts[path] = path
print(" ".join(f"--volume={source}:{target}:ro" for source, target in mounts.items()))
EOF
}

build_images() {
    debian_image
    local mounts
    read -ra mounts <<<"$(pip_mounts)"
    say "building $TORCH_IMAGE, $POSTGRES_IMAGE and $HPO_IMAGE (cached layers are reused)"
    podman build --quiet "${mounts[@]}" -t "$TORCH_IMAGE" -f "$SMOKE/torch.Containerfile" "$SMOKE" >/dev/null
    podman build --quiet -t "$POSTGRES_IMAGE" -f "$SMOKE/postgres.Containerfile" "$SMOKE" >/dev/null
    # The DEPLOY.md build command, with the CPU base instead of pytorch/pytorch.
    podman build --quiet "${mounts[@]}" --build-arg "BASE=$TORCH_IMAGE" -t "$HPO_IMAGE" \
        -f "$ROOT/docker/Dockerfile" "$ROOT" >/dev/null
    podman image ls --format '  {{.Repository}}:{{.Tag}} {{.Size}}' \
        | grep -E "hpo-smoke/(torch-cpu|postgres)|backbone-hpo" || true
}

# podman-compose's and podman's warnings (no systemd for healthcheck timers, no syslog) go
# to a log file, shown when the run fails.
compose() {
    "$PODMAN_COMPOSE" -p "$PROJECT" -f "$ROOT/docker/compose.yaml" \
        -f "$SMOKE/compose.override.yaml" "$@" 2>>"$CACHE/compose.log"
}

container() { echo "${PROJECT}_$1_${2:-1}"; }

# `down` removes the containers of one replica per service: the second worker is ours to remove.
remove_stack() {
    local names
    names=$(podman ps -a --filter "label=io.podman.compose.project=$PROJECT" --format '{{.Names}}')
    [ -z "$names" ] || podman rm --force --time 10 $names >/dev/null 2>&1
    compose down --volumes >/dev/null 2>&1
}

teardown() {
    local status=$?
    set +e
    if [ "$status" != 0 ]; then
        echo "--- last lines of $CACHE/compose.log"
        tail -n 15 "$CACHE/compose.log"
        for name in $(podman ps -a --filter "label=io.podman.compose.project=$PROJECT" --format '{{.Names}}'); do
            echo "--- last lines of $name"
            podman logs --tail 15 "$name" 2>&1
        done
    fi
    remove_stack
    rm -f "$ROOT/docker/.env"
    say "$([ "$status" = 0 ] && echo passed || echo failed), stack removed; elapsed $((SECONDS - started)) s"
}

start_stack() {
    { grep -v '^#' "$SMOKE/env"; echo "POSTGRES_PASSWORD=$(od -An -N12 -tx1 /dev/urandom | tr -d ' \n')"; } \
        >"$ROOT/docker/.env"
    trap teardown EXIT
    trap 'exit 143' INT TERM # so that a stopped run tears down too
    : >"$CACHE/compose.log"
    remove_stack || true # what an interrupted run left
    # compose.yaml's order, one step at a time: podman 4.3 cannot do it for podman-compose.
    # Without systemd it schedules no healthcheck, and before 4.6 it cannot wait for
    # service_healthy; the --requires links podman-compose adds for depends_on restart an
    # exited init and break on a chain of them (init needs postgres, the workers need init).
    # So: --no-deps, and the compose file's own pg_isready check run until it passes.
    say "up: postgres"
    compose up -d postgres >/dev/null
    wait_for 60 podman healthcheck run "$(container postgres)" || die "postgres never became healthy"
    say "postgres healthy; up: init"
    compose up -d --no-deps init >/dev/null
    local init_status
    init_status=$(podman wait "$(container init)")
    [ "$init_status" = 0 ] || die "init exited $init_status"
    say "init done: $(podman logs "$(container init)" 2>&1 | grep -m1 "created study")"
    say "up: worker x2 and dashboard"
    compose up -d --no-deps --scale worker=2 worker dashboard >/dev/null
}

check_gpu_locks() {
    local claims
    wait_for 60 sh -c "podman logs $(container worker 1) 2>&1 | grep -q 'one-gpu: GPU'" || die "worker 1 claimed no GPU"
    wait_for 60 sh -c "podman logs $(container worker 2) 2>&1 | grep -q 'one-gpu: GPU'" || die "worker 2 claimed no GPU"
    claims=$(for n in 1 2; do podman logs "$(container worker $n)" 2>&1 | grep -m1 'one-gpu: GPU'; done)
    say "GPU locks: $(echo "$claims" | tr '\n' ';')"
    [ "$(echo "$claims" | sort -u | wc -l)" = 2 ] || die "both workers claimed the same GPU"
}

# SIGTERM to worker 1 once a trial of its own has trained an epoch: it finishes the epoch,
# checkpoints it and hands the trial back.
stop_a_worker_mid_trial() {
    local worker line
    worker=$(container worker 1)
    wait_for 300 sh -c "podman logs $worker 2>&1 | grep -qE '^trial +[0-9]+ epoch +1/'" \
        || die "worker 1 trained no epoch"
    line=$(podman logs "$worker" 2>&1 | grep -m1 -E '^trial +[0-9]+ epoch +1/')
    say "podman stop $worker after: $line"
    # podman-compose applies stop_grace_period to its own stop and down only; a bare
    # `podman stop` waits 10 s before SIGKILL unless told the compose file's 2 minutes.
    podman stop --time 120 "$worker" >/dev/null
    say "worker 1 stopped (exit $(podman inspect "$worker" --format '{{.State.ExitCode}}')): $(podman logs --tail 2 "$worker" 2>&1 | head -1)"
    # As after `podman-compose stop worker`, carry on: it takes its GPU slot back.
    podman start "$worker" >/dev/null
    wait_for 60 sh -c "[ \$(podman logs $worker 2>&1 | grep -c 'one-gpu: GPU') = 2 ]" \
        || die "the restarted worker 1 claimed no GPU"
    say "worker 1 started again: $(podman logs "$worker" 2>&1 | grep 'one-gpu: GPU' | tail -1)"
}

hpo_in() { podman exec "$(container dashboard)" hpo "$@"; }

study_finished() { hpo_in status --study "$STUDY" | grep -qE "finished / target.* $TRIALS / $TRIALS"; }

check_study() {
    wait_for 600 study_finished || die "the study did not reach $TRIALS trials"
    say "hpo status --study $STUDY:"
    hpo_in status --study "$STUDY" | sed 's/^/  /'
    hpo_in status --study "$STUDY" | grep -qE "finished / target.* $TRIALS / $TRIALS" \
        || die "the study holds other than $TRIALS finished trials"
    podman exec -e STUDY="$STUDY" "$(container dashboard)" python3 -W ignore -c "$RESUMED_CHECK" \
        || die "the stopped trial was not resumed from its checkpoint"
}

# Every trial stopped mid-way (fail_reason "interrupted: ...") has a retry (Optuna's retry
# callback) that finished after resuming from its checkpoint: resumed_from_epoch >= 1.
RESUMED_CHECK='
import os, optuna
from optuna.storages import RetryFailedTrialCallback as Retry
study = optuna.load_study(study_name=os.environ["STUDY"], storage=os.environ["HPO_STORAGE"])
# A retry inherits its user attributes, the fail_reason too: the stopped ones are the FAILs.
stopped = [t for t in study.trials if t.state.name == "FAIL"
           and t.user_attrs.get("fail_reason", "").startswith("interrupted")]
assert stopped, "no trial was interrupted"
for trial in stopped:
    chain = [t for t in study.trials if Retry.retried_trial_number(t) == trial.number]
    for t in [trial, *chain]:
        resumed = t.user_attrs.get("resumed_from_epoch")
        reason = t.user_attrs.get("fail_reason") or "-"
        print(f"  trial {t.number}: {t.state.name}, retry of {Retry.retried_trial_number(t)}, "
              f"resumed from epoch {resumed}; {reason}")
    done = [t for t in chain if t.state.name in ("COMPLETE", "PRUNED")]
    assert done and done[-1].user_attrs.get("resumed_from_epoch", 0) >= 1, "no retry resumed"
'

check_dashboard() {
    local page=http://127.0.0.1:8080/dashboard/ profile
    profile=$(mktemp -d)
    wait_for 60 python3 -c "import urllib.request; urllib.request.urlopen('$page', timeout=5)" \
        || die "the dashboard does not answer on $page"
    chromium --headless --no-sandbox --disable-gpu --disable-background-networking \
        --disable-component-update --disable-sync --no-first-run --window-size=1400,1000 \
        --virtual-time-budget=15000 --user-data-dir="$profile" \
        --screenshot="$CACHE/dashboard.png" --dump-dom "$page" 2>/dev/null >"$CACHE/dashboard.html"
    rm -rf "$profile"
    grep -q "$STUDY" "$CACHE/dashboard.html" || die "the dashboard page does not show study $STUDY"
    say "dashboard through the published port shows study $STUDY ($CACHE/dashboard.png)"
}

main() {
    check_tools
    runtime_config
    build_images
    start_stack
    check_gpu_locks
    stop_a_worker_mid_trial
    check_study
    check_dashboard
}

main "$@"
