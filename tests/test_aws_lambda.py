"""The AWS Lambda handler and its Prefect REST client, without a server (tests/flows/test_watch.py
runs the handler against a real Prefect API)."""

from __future__ import annotations

import socket

import pytest

from stylize.app.aws_lambda import LAMBDA_ENV, PrefectApi, handler
from stylize.errors import ConfigError, PrefectApiError

from stylize.catalog.events import Routes

from test_events import notification, s3_record


def closed_port_url() -> str:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    return f"http://127.0.0.1:{port}/api"


def test_unreachable_api_names_the_setting():
    with pytest.raises(PrefectApiError, match="cannot reach the Prefect API .*check PREFECT_API_URL"):
        PrefectApi(closed_port_url(), timeout=5).deployment_id("stylize-catalog/catalog")


def test_handler_needs_its_environment(monkeypatch):
    for name in ("PREFECT_API_URL", "STYLIZE_DEPLOYMENT", *LAMBDA_ENV.values()):
        monkeypatch.delenv(name, raising=False)
    with pytest.raises(ConfigError, match="set PREFECT_API_URL and STYLIZE_DEPLOYMENT"):
        handler(notification(s3_record()), None)
    monkeypatch.setenv("PREFECT_API_URL", closed_port_url())
    monkeypatch.setenv("STYLIZE_DEPLOYMENT", "no-slash")
    monkeypatch.setenv("STYLIZE_MANIFEST_PREFIX", "s3://bkt/manifests/")
    # Nothing to start: no API call, so neither the bad name nor the dead API matters yet.
    assert handler(notification(s3_record()), None)["ignored"] == 1
    with pytest.raises(ConfigError, match="STYLIZE_DEPLOYMENT 'no-slash': expected 'flow name/deployment name'"):
        handler(notification(s3_record(key="manifests/a.yaml")), None)


def test_routes_name_the_lambda_variables():
    with pytest.raises(ConfigError, match="STYLIZE_IMAGES_PREFIX needs STYLIZE_STANDING_MANIFEST"):
        Routes(images_prefix="s3://b/p/", options=LAMBDA_ENV)
