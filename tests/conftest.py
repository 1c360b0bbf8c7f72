import os
import shutil
import socket

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

from auditor import runtime, workspace  # noqa: E402

# The suite runs the library as the CLI does (and before torch loads): reproducible MKL products, sleeping threads.
runtime.tune_process()

from . import small_world  # noqa: E402
from .helpers import S3_BUCKET  # noqa: E402


@pytest.fixture(scope="session")
def tiny_encoder(tmp_path_factory):
    return small_world.build_encoder(tmp_path_factory.mktemp("encoder") / "bundle")


@pytest.fixture(scope="session")
def training_dir(tmp_path_factory):
    return small_world.build_training(tmp_path_factory.mktemp("world") / "training")


@pytest.fixture(scope="session")
def outputs_dir(tmp_path_factory):
    return small_world.build_outputs(tmp_path_factory.mktemp("world") / "outputs")


@pytest.fixture
def ws(tmp_path, tiny_encoder):
    return workspace.init(tmp_path / "ws", encoder=tiny_encoder)


@pytest.fixture(scope="session")
def indexed_template(tmp_path_factory, tiny_encoder, training_dir):
    """A workspace with the small world indexed once; tests copy it instead of re-indexing."""
    from auditor.index import index_training

    ws = workspace.init(tmp_path_factory.mktemp("indexed") / "ws", encoder=tiny_encoder)
    index_training(ws, training_dir)
    return ws


@pytest.fixture
def indexed_ws(tmp_path, indexed_template):
    target = tmp_path / "ws"
    shutil.copytree(indexed_template.root, target, symlinks=True)
    return workspace.load(target)


@pytest.fixture(scope="session")
def tiny_pipeline(tmp_path_factory):
    from . import tiny_sd

    return tiny_sd.build(tmp_path_factory.mktemp("sd") / "pipeline")


@pytest.fixture
def scanned_ws(indexed_ws, outputs_dir, tiny_pipeline):
    """The small world indexed and scanned, with the tiny diffusion model configured."""
    from auditor.scan import scan

    indexed_ws.config.paths.model = str(tiny_pipeline)
    # Small teacher settings: the tests check behaviour, not attribution quality.
    indexed_ws.config.confirm = indexed_ws.config.confirm.override(
        candidates=20, controls=8, draws=8, timesteps=4, fisher_samples=16, reference_samples=8, k=5
    )
    indexed_ws.save()
    scan(indexed_ws, outputs_dir, top_k=5)
    return indexed_ws


CHEAP_TEACHER = dict(draws=4, timesteps=2, fisher_samples=8, reference_samples=4)


@pytest.fixture(scope="session")
def cheap_teacher(tiny_pipeline):
    """Configures a workspace for the tiny model with an AbU teacher cheap enough to run many times in a test."""

    def configure(ws):
        ws.config.paths.model = str(tiny_pipeline)
        ws.config.confirm = ws.config.confirm.override(**CHEAP_TEACHER)
        ws.save()
        return ws

    return configure


@pytest.fixture(scope="module")
def model(tiny_pipeline):
    """The tiny pipeline loaded as the teachers see it."""
    import torch

    from auditor import diffusion

    return diffusion.load(tiny_pipeline, torch.device("cpu"))


@pytest.fixture
def s3(monkeypatch):
    """A moto S3 server on 127.0.0.1 with one bucket (S3_BUCKET); dummy keys in the environment, no endpoint there.
    Yields (endpoint, boto3 client)."""
    moto_server = pytest.importorskip("moto.server")
    boto3 = pytest.importorskip("boto3")
    for name in ("AWS_ENDPOINT", "AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3", "AWS_ALLOW_HTTP", "AWS_PROFILE"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "testing")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "testing")
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    server = moto_server.ThreadedMotoServer(ip_address="127.0.0.1", port=port)
    server.start()
    try:
        endpoint = f"http://127.0.0.1:{port}"
        client = boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1")
        client.create_bucket(Bucket=S3_BUCKET)
        yield endpoint, client
    finally:
        server.stop()
