"""The Triton layout (`nvae export-onnx --layout triton`): the repository's files, a config.pbtxt read from the
graph and parsed by Triton's own ModelConfig, and the model run by a stock runtime (OpenVINO) outside our code."""

import json

import numpy as np
import onnx
import pytest
import torch
from tiny import TINY

from cli.main import main
from common.errors import ConfigError
from inference.export import export_onnx, metadata_of, randomize_bn
from inference.triton import LayoutError, triton_config
from model.checkpoint import load_model, save_checkpoint
from model.config import apply_overrides, get_preset
from model.network import NVAE
from model.prior_sampling import draw_noise, sample_images
from serving.onnx_sampler import OnnxSampler

NAME = "nvae-decoder"
MAX_BATCH = 16


def tiny_model() -> NVAE:
    """The tiny fmnist-cpu model with BN layers far from the identity (as test_export.py's)."""
    torch.manual_seed(0)
    model = NVAE(apply_overrides(get_preset("fmnist-cpu"), TINY))
    randomize_bn(model, 0)
    return model.eval()


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    path = tmp_path_factory.mktemp("triton") / "model.pt"
    save_checkpoint(path, tiny_model(), extra={"bn_readjust": {"temperature": 0.7}})
    return path


@pytest.fixture(scope="module")
def repository(ckpt):
    """The default exporter's Triton layout of the tiny checkpoint, and its ExportResult."""
    out = ckpt.parent / "repository"
    return out, export_onnx(ckpt, out, layout="triton", model_name=NAME, max_batch_size=MAX_BATCH)


def _feeds(path, batch: int, temperatures) -> dict[str, np.ndarray]:
    """Client-drawn noise for every input of the graph, from its own shapes: eps_j standard normal, one
    temperature per image."""
    rng = np.random.default_rng(batch)
    feeds = {}
    for v in onnx.load(str(path)).graph.input:
        shape = [batch] + [d.dim_value for d in v.type.tensor_type.shape.dim[1:]]
        feeds[v.name] = rng.standard_normal(shape).astype(np.float32)
    feeds["temperature"] = np.asarray(temperatures, np.float32).reshape(batch, 1)
    return feeds


def test_triton_layout_writes_the_model_and_its_config_in_the_repository(repository):
    out, result = repository
    assert result.path == out / NAME / "1" / "model.onnx" and result.path.is_file()
    assert result.config == out / NAME / "config.pbtxt" and result.config.is_file()
    assert sorted(p.name for p in (out / NAME).iterdir()) == ["1", "config.pbtxt"]  # no temporary files left
    assert result.inputs["temperature"] == ["batch", 1]
    assert all(shape[0] == "batch" for shape in (*result.inputs.values(), *result.outputs.values()))
    assert json.loads(metadata_of(result.path)["nvae.temperature_shape"]) == ["batch", 1]
    assert result.max_abs_diff is not None and result.max_abs_diff < 1e-4


def _model_config_pb2():
    """tritonclient's ModelConfig module, loaded from its file: importing `tritonclient.grpc` also registers
    Triton's `inference.*` service protos, which clash with the kserve package's in one process."""
    import importlib.util
    from pathlib import Path

    spec = importlib.util.find_spec("tritonclient")
    if spec is None:
        pytest.skip("tritonclient[grpc] is not installed (pip install 'tritonclient[grpc]')")
    path = Path(spec.submodule_search_locations[0]) / "grpc" / "model_config_pb2.py"
    module_spec = importlib.util.spec_from_file_location("_triton_model_config_pb2", path)
    module = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(module)
    return module


def test_config_parses_into_tritons_model_config_with_every_port_of_the_graph(repository):
    model_config_pb2 = _model_config_pb2()
    from google.protobuf import text_format

    out, result = repository
    config = text_format.Parse(result.config.read_text(), model_config_pb2.ModelConfig())
    assert config.name == NAME and config.platform == "onnxruntime_onnx"
    assert config.max_batch_size == MAX_BATCH
    assert config.HasField("dynamic_batching")
    assert [(g.count, g.kind) for g in config.instance_group] == [
        (1, model_config_pb2.ModelInstanceGroup.KIND_AUTO)
    ]
    graph = onnx.load(str(result.path)).graph
    fp32 = model_config_pb2.DataType.Value("TYPE_FP32")
    for ports, values in ((config.input, graph.input), (config.output, graph.output)):
        assert [p.name for p in ports] == [v.name for v in values]
        for port, v in zip(ports, values, strict=True):
            assert port.data_type == fp32
            # max_batch_size > 0: Triton's dims leave out the (dynamic) batch dimension
            assert list(port.dims) == [d.dim_value for d in v.type.tensor_type.shape.dim[1:]]
    groups = len(json.loads(metadata_of(result.path)["nvae.latent_shapes"]))
    assert [p.name for p in config.input] == ["temperature"] + [f"eps_{j}" for j in range(groups)]
    assert list(config.input[0].dims) == [1]
    assert list(config.output[0].dims) == [1, 28, 28]


def test_config_without_triton_batching_keeps_the_batch_dimension_as_minus_one(repository):
    _, result = repository
    text = triton_config(result.path, max_batch_size=0)
    assert "max_batch_size: 0" in text and "dynamic_batching" not in text
    assert 'name: "temperature"\n    data_type: TYPE_FP32\n    dims: [ -1, 1 ]' in text


def test_a_scalar_temperature_graph_cannot_be_batched_by_triton(ckpt, tmp_path):
    """The file layout's temperature (1,) has no batch dimension: Triton could not concatenate requests."""
    path = export_onnx(ckpt, tmp_path / NAME / "1" / "model.onnx", verify=False).path
    with pytest.raises(LayoutError, match="temperature"):
        triton_config(path, max_batch_size=8)
    assert "dims: [ 1 ]" in triton_config(path, max_batch_size=0)


def test_per_image_temperature_gives_each_image_its_own_temperature(ckpt, repository):
    """One run of a mixed-temperature batch equals PyTorch at each image's temperature."""
    import onnxruntime as ort

    _, result = repository
    model, _ = load_model(ckpt)
    model.eval()
    eps = draw_noise(model, 4, seed=5)
    temps = [0.6, 0.6, 1.0, 0.8]
    feeds = {f"eps_{j}": e.numpy() for j, e in enumerate(eps)}
    feeds["temperature"] = np.array(temps, np.float32).reshape(4, 1)
    session = ort.InferenceSession(str(result.path), providers=["CPUExecutionProvider"])
    (got,) = session.run(["images_continuous"], feeds)
    for i, t in enumerate(temps):
        with torch.no_grad():
            logits = model.sample_logits(1, t, eps=[e[i : i + 1] for e in eps])
        ref = model.crop(model.output_distribution(logits).mean()).numpy()
        assert np.abs(got[i : i + 1] - ref).max() <= 1e-4


def test_our_sampler_serves_the_triton_layouts_model_too(ckpt, repository):
    _, result = repository
    model, _ = load_model(ckpt)
    got = OnnxSampler(result.path, providers="cpu").sample(5, 0.8, seed=2, batch_size=2)
    ref = sample_images(model.eval(), 5, 0.8, seed=2, decode="mean").numpy()
    assert np.abs(got - ref).max() <= 1 / 255 + 1e-6 and (got != ref).mean() < 1e-3


@pytest.mark.parametrize("batch", [1, 5])
def test_openvino_runs_the_exported_model_like_onnxruntime(repository, batch):
    ov = pytest.importorskip("openvino", reason="openvino is not installed (pip install openvino)")
    import onnxruntime as ort

    _, result = repository
    feeds = _feeds(result.path, batch, np.linspace(0.6, 1.0, batch))
    session = ort.InferenceSession(str(result.path), providers=["CPUExecutionProvider"])
    ref_images, ref_continuous = session.run(["images", "images_continuous"], feeds)
    # The CPU plugin computes in bf16 by default where the CPU has bf16 units (AMX, AVX512-BF16): ~3e-4 here.
    compiled = ov.Core().compile_model(str(result.path), "CPU", {"INFERENCE_PRECISION_HINT": "f32"})
    outputs = compiled(feeds)
    got = {port.get_any_name(): value for port, value in outputs.items()}
    assert got["images_continuous"].shape == ref_continuous.shape == (batch, 1, 28, 28)
    assert np.abs(got["images_continuous"] - ref_continuous).max() <= 1e-4
    level = np.abs(got["images"] - ref_images)  # quantised: a value at a rounding boundary may move one level
    assert level.max() <= 1 / 255 + 1e-6 and (level > 1e-6).mean() < 1e-3


def test_cli_writes_the_triton_layout(ckpt, tmp_path, capsys):
    out = tmp_path / "repo"
    args = ["export-onnx", "--checkpoint", str(ckpt), "--out", str(out), "--layout", "triton"]
    assert (
        main(
            [
                *args,
                "--exporter",
                "torchscript",
                "--no-verify",
                "--model-name",
                "dec",
                "--max-batch-size",
                "4",
            ]
        )
        == 0
    )
    assert (out / "dec" / "1" / "model.onnx").is_file()
    config = (out / "dec" / "config.pbtxt").read_text()
    assert 'name: "dec"' in config and "max_batch_size: 4" in config
    assert f"triton config: {out / 'dec' / 'config.pbtxt'}" in capsys.readouterr().out


def test_export_rejects_an_unknown_layout_and_a_bad_model_name(ckpt, tmp_path):
    with pytest.raises(ConfigError, match="layout"):
        export_onnx(ckpt, tmp_path / "x", layout="tar")
    with pytest.raises(ConfigError, match="model_name"):
        export_onnx(ckpt, tmp_path / "x", layout="triton", model_name="../up")
