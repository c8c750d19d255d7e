"""Fixtures of the pipeline tests."""

import pytest

from tests.servers import mlflow_server_at


@pytest.fixture
def mlflow_server(tmp_path):
    """A real `mlflow server` on 127.0.0.1 for one test; its URL."""
    with mlflow_server_at(tmp_path) as url:
        yield url
