"""prefect.yaml and the Kubernetes job template: each deployment names a real flow, valid parameters and schedules.

Registering them on a server is tested in tests/flows/test_serve.py.
"""

from __future__ import annotations

import importlib
import json
from pathlib import Path

import pytest
import yaml
from prefect import Flow
from prefect.client.schemas.schedules import CronSchedule

ROOT = Path(__file__).parent.parent
DOC = yaml.safe_load((ROOT / "prefect.yaml").read_text())
DEPLOYMENTS = {d["name"]: d for d in DOC["deployments"]}
TEMPLATE = json.loads((ROOT / "deploy" / "kubernetes-gpu-job-template.json").read_text())


def flow_of(entrypoint: str) -> Flow:
    """The object at ``path/to/file.py:name``, imported as the module that file is in this project."""
    path, name = entrypoint.split(":")
    assert (ROOT / path).is_file(), f"{entrypoint}: no file {path}"
    module = importlib.import_module(path.removesuffix(".py").replace("/", "."))
    return getattr(module, name)


@pytest.mark.parametrize("name", DEPLOYMENTS)
def test_entrypoint_is_a_flow_and_parameters_fit_it(name):
    deployment = DEPLOYMENTS[name]
    flow = flow_of(deployment["entrypoint"])
    assert isinstance(flow, Flow), f"{deployment['entrypoint']} is a {type(flow).__name__}, not a Prefect flow"
    flow.validate_parameters(deployment["parameters"])  # raises on a missing or mistyped parameter


@pytest.mark.parametrize("name", [n for n, d in DEPLOYMENTS.items() if d.get("schedules")])
def test_schedules_are_valid_nightly_crons(name):
    for schedule in DEPLOYMENTS[name]["schedules"]:
        checked = CronSchedule(cron=schedule["cron"], timezone=schedule["timezone"])  # the server's own checks
        assert (checked.cron, checked.timezone) == ("0 2 * * *", "UTC")


def test_sharded_parent_starts_a_deployment_of_this_file():
    parent = DEPLOYMENTS["nightly-k8s"]
    flow_name, _, deployment = parent["parameters"]["deployment"].partition("/")
    assert flow_of(DEPLOYMENTS[deployment]["entrypoint"]).name == flow_name
    assert DEPLOYMENTS[deployment]["work_pool"]["name"] == parent["work_pool"]["name"] == "stylize-k8s"


def test_kubernetes_job_variables_are_variables_of_the_pool_template():
    declared = set(TEMPLATE["variables"]["properties"])
    for name, deployment in DEPLOYMENTS.items():
        if deployment["work_pool"]["name"] == "stylize-k8s":
            unknown = set(deployment["work_pool"]["job_variables"]) - declared
            assert not unknown, f"{name}: job_variables {sorted(unknown)} are not in the pool's template"
    [container] = TEMPLATE["job_configuration"]["job_manifest"]["spec"]["template"]["spec"]["containers"]
    assert container["resources"]["limits"]["nvidia.com/gpu"] == "{{ gpu_limit }}"
    assert TEMPLATE["variables"]["properties"]["gpu_limit"]["default"] == 1


# --- automations: notify when a nightly run fails, and when none has completed in 26 hours ---

AUTOMATIONS = {a["name"]: a for a in DOC["automations"]}


def flow_run_event(state: str, deployment: str, flow: str = "stylize-catalog"):
    """A flow run state-change event with the related resources the Prefect server gives it."""
    from types import SimpleNamespace
    from uuid import uuid4

    from prefect.server.events.schemas.events import ReceivedEvent
    from prefect.server.models.events import _as_resource_data, _resource_data_as_related_resources
    from prefect.types._datetime import now

    def thing(name: str):
        return SimpleNamespace(id=uuid4(), name=name, tags=[], type="process")

    run = thing("nightly-run")
    data = _as_resource_data(run, thing(flow), thing(deployment), thing("default"), thing("stylize-gpu"))
    return ReceivedEvent(occurred=now("UTC"), event=f"prefect.flow-run.{state}", id=uuid4(),
                         resource={"prefect.resource.id": f"prefect.flow-run.{run.id}"},
                         related=_resource_data_as_related_resources(data, excluded_kinds=["flow-run"]))


def server_trigger(name: str):
    """The automation's trigger as the Prefect server evaluates it."""
    from prefect.server.events.schemas.automations import AutomationCore

    return AutomationCore.model_validate(AUTOMATIONS[name]).trigger


@pytest.mark.parametrize("name", AUTOMATIONS)
def test_automations_are_valid_and_notify_the_configured_block(name):
    from prefect.events.schemas.automations import AutomationCore

    automation = AutomationCore.model_validate(AUTOMATIONS[name])  # what `prefect automation create` checks
    [action] = automation.actions
    assert action.type == "send-notification"
    assert str(action.block_document_id) == DOC["definitions"]["notify"]


@pytest.mark.parametrize("state, deployment, fires", [
    ("Failed", "nightly", True), ("Crashed", "nightly-k8s", True), ("Completed", "nightly", False),
    ("Failed", "k8s-shard", False),  # a failed shard fails its parent, which notifies once
    ("Failed", "adhoc", False),
])
def test_failed_nightly_run_notifies(state, deployment, fires):
    trigger = server_trigger("stylize nightly failed")
    assert trigger.posture == "Reactive"
    assert trigger.covers(flow_run_event(state, deployment)) is fires


def test_missing_nightly_run_notifies_after_26_hours():
    from datetime import timedelta

    trigger = server_trigger("stylize nightly missing")
    # Proactive: fires when fewer than `threshold` matching events arrive within `within`.
    assert (trigger.posture, trigger.threshold, trigger.within) == ("Proactive", 1, timedelta(hours=26))
    assert trigger.covers(flow_run_event("Completed", "nightly"))
    assert trigger.covers(flow_run_event("Completed", "nightly-k8s", flow="stylize-sharded"))
    assert not trigger.covers(flow_run_event("Failed", "nightly"))
    assert not trigger.covers(flow_run_event("Completed", "k8s-shard"))


def test_prefect_deploy_reads_the_file_with_its_automations():
    from prefect.cli.deploy._models import PrefectYamlModel

    model = PrefectYamlModel.model_validate(DOC)  # what `prefect deploy` validates; it ignores `automations`
    assert [d.name for d in model.deployments] == list(DEPLOYMENTS)
