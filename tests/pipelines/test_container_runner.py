"""The docker runner's podman-safe container handling, against a fake Docker SDK client (the real run, every
step in its image, is scripts/container_check.sh)."""

import stat

import docker
import pytest

from common.errors import NVAEError
from pipelines.container_runner import docker_runner, run_container


class FakeContainer:
    def __init__(self, status, log):
        self.status, self.log, self.removed = status, log, False

    def logs(self, stream, follow):
        assert stream and follow
        yield from self.log

    def wait(self):
        return {"StatusCode": self.status}

    def remove(self, force):
        self.removed = True


class FakeClient:
    def __init__(self, status=0, images=("img:1",), log=(b"line 1\n", b"line 2\n")):
        self.known, self.runs = set(images), []
        self.container = FakeContainer(status, list(log))
        self.images = self
        self.containers = self

    def get(self, image):  # client.images.get
        if image not in self.known:
            raise docker.errors.ImageNotFound(image)

    def run(self, **kwargs):  # client.containers.run
        self.runs.append(kwargs)
        return self.container


@pytest.mark.parametrize("status", [0, 3])
def test_exit_status_comes_from_wait_and_the_container_is_removed_after(capsys, status):
    client = FakeClient(status=status)
    assert (
        run_container(client, "img:1", ["sh", "-c", "x"], {"/r": {"bind": "/r"}}, network_mode="host")
        == status
    )
    (kwargs,) = client.runs
    assert "auto_remove" not in kwargs  # podman answers 500, not 404, for a vanished auto-removed container
    assert kwargs["detach"] and kwargs["network_mode"] == "host" and kwargs["command"] == ["sh", "-c", "x"]
    assert client.container.removed
    assert capsys.readouterr().out == "line 1\nline 2\n"


def test_a_missing_image_is_named_and_never_pulled():
    client = FakeClient(images=())
    with pytest.raises(NVAEError, match=r"img:1 is not on this machine.*scripts/images.sh"):
        run_container(client, "img:1", ["true"], {})
    assert client.runs == []


def test_runner_root_is_writable_by_the_image_user_and_store_settings_pass_through(tmp_path, monkeypatch):
    from kfp.local import docker_task_handler

    monkeypatch.setattr(docker_task_handler, "run_docker_container", docker_task_handler.run_docker_container)
    monkeypatch.setenv("AWS_ENDPOINT_URL", "http://127.0.0.1:9")
    monkeypatch.delenv("AWS_ACCESS_KEY_ID", raising=False)
    runner = docker_runner(tmp_path / "root", env_names=("AWS_ENDPOINT_URL", "AWS_ACCESS_KEY_ID"))
    mode = (tmp_path / "root").stat().st_mode
    assert stat.S_IMODE(mode) == 0o1777
    assert runner.container_run_args["network_mode"] == "host"
    assert runner.container_run_args["environment"] == {"AWS_ENDPOINT_URL": "http://127.0.0.1:9"}
    assert docker_task_handler.run_docker_container is run_container


def test_executor_input_is_folded_into_one_line(monkeypatch):
    from pipelines.local_logs import fold_executor_input, lines_of

    monkeypatch.delenv("NVAE_FULL_EXECUTOR_LOG", raising=False)
    log = [
        "[KFP Executor 2026 INFO]: Loading component\n",
        "[KFP Executor 2026 INFO]: Got executor_input:\n",
        "{\n",
        '    "inputs": {"parameterValues": {"a": "{not a brace}"}},\n',
        '    "outputs": {\n',
        '        "outputFile": "/x"\n',
        "    }\n",
        "}\n",
        "+ nvae train ...\n",
    ]
    out = list(fold_executor_input(log))
    assert out[:2] == log[:2] and out[-1] == "+ nvae train ...\n"
    assert len(out) == 4 and "6 lines of JSON folded" in out[2]
    monkeypatch.setenv("NVAE_FULL_EXECUTOR_LOG", "1")
    assert list(fold_executor_input(log)) == log
    assert list(lines_of([b"a\nb", b"c\n", b"d"])) == ["a\n", "bc\n", "d"]


def test_an_image_chosen_at_run_time_is_taken_from_the_task_executor_input():
    """A step whose image validate-params chose (a placeholder KFP's driver resolves on a cluster) runs in
    the image its executor input names."""
    import json

    executor_input = {"inputs": {"parameterValues": {"pipelinechannel--validate-params-eval_image": "gpu:2"}}}
    command = [
        "sh",
        "-c",
        "run",
        "--executor_input",
        json.dumps(executor_input),
        "--function_to_execute",
        "f",
    ]
    client = FakeClient(images=("gpu:2",))
    placeholder = "{{$.inputs.parameters['pipelinechannel--validate-params-eval_image']}}"
    assert run_container(client, placeholder, command, {}) == 0
    (kwargs,) = client.runs
    assert kwargs["image"] == "gpu:2"
