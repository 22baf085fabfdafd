"""kfp.local's DockerRunner, made to work with podman as well as Docker: every task runs in its image, as the
image's user (UID 10001), with the compiled executor command, as it would in a pod.

Talks to whatever `DOCKER_HOST` points at (podman: `podman system service unix:///PATH/podman.sock`).
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

from common.errors import NVAEError
from pipelines.local_logs import fold_executor_input, lines_of

_PARAMETER = re.compile(r"\{\{\$\.inputs\.parameters\['([^']+)'\]\}\}")


def resolve_image(image: str, command: list[str]) -> str:
    """The image a task runs in. A step whose image the pipeline sets at run time (`set_container_image` with
    an upstream output) has a placeholder there, which KFP's driver resolves on a cluster and kfp.local does
    not: take the value from the task's own executor input, where the placeholder's parameter is."""
    match = _PARAMETER.fullmatch(image)
    if match is None:
        return image
    executor_input = json.loads(command[command.index("--executor_input") + 1])
    return executor_input["inputs"]["parameterValues"][match.group(1)]


def run_container(client, image: str, command: list[str], volumes: dict, **run_args) -> int:
    """Run one task's container to completion, streaming its log; returns its exit status.

    Replaces kfp's `docker_task_handler.run_docker_container`, which starts the container with
    auto-remove and then treats a vanished container as success only if the engine answers 404. podman 4.3
    answers 500 ("no such container") once an auto-removed container is gone, which kfp reports as a
    failed task (or an exception) although the step succeeded. Here the container is not auto-removed:
    follow its log, wait for its exit status, then remove it. Images are never pulled: a missing image
    is an error naming it (build it with scripts/images.sh), as nothing may be fetched at run time.
    """
    import docker

    image = resolve_image(image, command)
    try:
        client.images.get(image)
    except docker.errors.ImageNotFound:
        raise NVAEError(f"image {image} is not on this machine; build it with scripts/images.sh") from None
    container = client.containers.run(
        image=image, command=command, volumes=volumes, detach=True, stdout=True, stderr=True, **run_args
    )
    try:
        for line in fold_executor_input(lines_of(container.logs(stream=True, follow=True))):
            print(line, end="", flush=True)
        return int(container.wait()["StatusCode"])
    finally:
        container.remove(force=True)


def docker_runner(root: Path, env_names: tuple[str, ...] = ()):
    """A DockerRunner for a local run under `root` (the pipeline root, bind-mounted into every task).

    - The root is made world-writable (mode 1777, like /tmp): the image user must write its outputs and
      executor metadata there.
    - The tasks share the host's network, so an S3-API server on this machine's loopback (the tests'
      SeaweedFS, a port-forwarded MinIO) is reachable at the same URL; the variables named in `env_names`
      (endpoint and keys, as the cluster's Secret provides them) are passed through when set.
    """
    from kfp import local
    from kfp.local import docker_task_handler

    docker_task_handler.run_docker_container = run_container
    root.mkdir(parents=True, exist_ok=True)
    root.chmod(0o1777)
    env = {name: os.environ[name] for name in env_names if name in os.environ}
    if "AWS_DEFAULT_REGION" in os.environ:
        env["AWS_DEFAULT_REGION"] = os.environ["AWS_DEFAULT_REGION"]
    return local.DockerRunner(network_mode="host", environment=env)
