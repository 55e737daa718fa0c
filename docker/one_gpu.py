#!/usr/bin/env python3
"""`one-gpu COMMAND...`: run COMMAND on one GPU of this host that no other replica holds.

`docker compose up --scale worker=4` gives every replica the same device request, and
`count: 1` means GPU 0 in each of them (docker/compose#11863), so four workers would share
one GPU. Instead every replica reserves all GPUs, and this wrapper takes the first one whose
lock file, in a volume all replicas mount, it can flock; CUDA_VISIBLE_DEVICES then shows the
command that GPU alone. The lock is held by the command itself (its file descriptor survives
exec), and the kernel drops it when the container stops, so a restarted worker finds a free
GPU again. Replicas beyond the GPU count wait for one.

ONE_GPU_COUNT, where set, is the number of GPUs to share out instead of the count torch sees:
docker/smoke.sh sets it on a host without GPUs, so that its replicas still race for the locks.
"""

from __future__ import annotations

import fcntl
import os
import sys
import time
from pathlib import Path

LOCK_DIR = Path("/gpu-locks")
WAIT_S = 30.0


def claim(lock_dir: Path, count: int) -> int | None:
    """Lock the first free GPU of `count` and return its index; None when all are held."""
    for gpu in range(count):
        fd = os.open(lock_dir / f"gpu{gpu}.lock", os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            continue
        os.set_inheritable(fd, True)  # kept across exec: the command holds the lock
        return gpu
    return None


def main() -> None:
    import torch  # here, so that importing claim() needs no CUDA

    command = sys.argv[1:]
    if not command:
        sys.exit("usage: one-gpu COMMAND [ARG...]")
    count = int(os.environ.get("ONE_GPU_COUNT") or torch.cuda.device_count())
    if count == 0:
        sys.exit("one-gpu: no GPU is visible; is the NVIDIA container toolkit set up?")
    waiting = False
    while (gpu := claim(LOCK_DIR, count)) is None:
        if not waiting:
            print(f"one-gpu: all {count} GPUs are held by other workers; waiting", flush=True)
            waiting = True
        time.sleep(WAIT_S)
    # Where the container was already narrowed to some GPUs, name the one claimed as given.
    given = os.environ.get("CUDA_VISIBLE_DEVICES")
    names = given.split(",")[:count] if given else [str(i) for i in range(count)]
    print(f"one-gpu: GPU {names[gpu]} ({gpu + 1} of {count})", flush=True)
    os.environ["CUDA_VISIBLE_DEVICES"] = names[gpu].strip()
    os.execvp(command[0], command)


if __name__ == "__main__":
    main()
