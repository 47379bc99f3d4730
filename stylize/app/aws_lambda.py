"""The AWS Lambda entry point: start catalog runs for new S3 objects through the Prefect REST API.

``handler`` reads the notifications (``stylize.catalog.events`` parses and
routes them) and creates flow runs of a deployment with ``PrefectApi``, a
few calls of the REST API over ``urllib``. It imports neither Prefect nor
torch, so a Lambda package needs only the standard library, boto3 and this
package: point the Lambda at ``stylize.app.aws_lambda.handler``.
"""

from __future__ import annotations

import json
import logging
import os
import urllib.error
import urllib.request
from typing import Any, Iterable
from urllib.parse import quote

from stylize.catalog.events import Routes, RunRequest, parse_event, split_deployment_name
from stylize.errors import ConfigError, PrefectApiError

log = logging.getLogger(__name__)


class PrefectApi:
    """Just enough of the Prefect REST API to start a deployment's flow run, over plain HTTP.

    ``url`` is what ``PREFECT_API_URL`` holds (``http://host:4200/api``, or
    a Prefect Cloud workspace URL); ``api_key`` is sent as a bearer token.
    Uses ``urllib`` so that a Lambda needs no HTTP package.
    """

    def __init__(self, url: str, api_key: str | None = None, *, timeout: float = 30.0):
        self.url = url.rstrip("/")
        self.api_key = api_key
        self.timeout = timeout

    def deployment_id(self, name: str) -> str:
        """The id of deployment ``name`` ("flow name/deployment name")."""
        flow_name, deployment_name = split_deployment_name(name, "STYLIZE_DEPLOYMENT")
        status, body = self._call("GET", f"/deployments/name/{quote(flow_name, safe='')}/"
                                         f"{quote(deployment_name, safe='')}", None, missing_ok=True)
        if status == 404:
            raise PrefectApiError(f"deployment {name!r} not found at {self.url}; "
                                  "`prefect deployment ls` lists the deployments there")
        return body["id"]

    def create_flow_run(
        self, deployment_id: str, request: RunRequest, *, tags: Iterable[str] = (),
    ) -> tuple[dict, bool]:
        """Create (or find) the flow run of ``request``: (flow run JSON, whether it is new).

        The server returns the existing run when one with the same
        idempotency key exists (HTTP 200 instead of 201).
        """
        status, body = self._call("POST", f"/deployments/{deployment_id}/create_flow_run", {
            "parameters": request.parameters,
            "idempotency_key": request.idempotency_key,
            "tags": list(tags),
        })
        return body, status == 201

    def _call(self, method: str, path: str, payload: Any, *, missing_ok: bool = False) -> tuple[int, Any]:
        url = self.url + path
        headers = {"Accept": "application/json"}
        data = None
        if payload is not None:
            data = json.dumps(payload).encode()
            headers["Content-Type"] = "application/json"
        if self.api_key:
            headers["Authorization"] = f"Bearer {self.api_key}"
        http_request = urllib.request.Request(url, data=data, headers=headers, method=method)
        try:
            with urllib.request.urlopen(http_request, timeout=self.timeout) as response:
                return response.status, json.loads(response.read() or b"null")
        except urllib.error.HTTPError as exc:
            if exc.code == 404 and missing_ok:
                return 404, None
            detail = exc.read().decode("utf-8", "replace")[:300]
            hint = "; check PREFECT_API_KEY" if exc.code in (401, 403) else ""
            raise PrefectApiError(f"{method} {url}: HTTP {exc.code}: {detail}{hint}") from None
        except (urllib.error.URLError, OSError) as exc:
            reason = getattr(exc, "reason", exc)
            raise PrefectApiError(f"{method} {url}: cannot reach the Prefect API ({reason}); "
                                  "check PREFECT_API_URL") from None
        except ValueError as exc:
            raise PrefectApiError(f"{method} {url}: expected a JSON response ({exc})") from None


#: Environment variables of the Lambda handler, by setting.
LAMBDA_ENV = {
    "manifest_prefix": "STYLIZE_MANIFEST_PREFIX",
    "images_prefix": "STYLIZE_IMAGES_PREFIX",
    "standing_manifest": "STYLIZE_STANDING_MANIFEST",
}


def handler(event: Any, context: Any = None) -> dict[str, Any]:
    """AWS Lambda entry point: start catalog runs for new S3 objects through the Prefect API.

    Takes S3 event notifications (S3 invoking the Lambda), SQS or SNS batches
    of them, and EventBridge "Object Created" events. Each new manifest under
    ``STYLIZE_MANIFEST_PREFIX`` starts a flow run of the deployment
    ``STYLIZE_DEPLOYMENT`` ("flow/deployment") for that manifest; the images
    under ``STYLIZE_IMAGES_PREFIX`` start one flow run of
    ``STYLIZE_STANDING_MANIFEST``. ``PREFECT_API_URL`` and ``PREFECT_API_KEY``
    say where the API is.

    There is no debounce across invocations: a Lambda keeps nothing between
    them, so each invocation starts one run for all the images it carries.
    S3 invoking the Lambda directly sends one object per invocation, hence one
    run per image (cheap: finished jobs are skipped, but each run re-expands
    the grid); to batch, deliver through SQS with a batching window. The
    idempotency keys still dedupe redeliveries: the same event twice starts
    one run.

    Returns a summary (runs started, runs that already existed, what was
    skipped or malformed). Malformed parts are logged and dropped, as a
    retry would not fix them; a Prefect API failure raises PrefectApiError
    so that Lambda retries the event.
    """
    env = os.environ
    missing = [name for name in ("PREFECT_API_URL", "STYLIZE_DEPLOYMENT") if not env.get(name)]
    if missing:
        raise ConfigError(f"stylize.app.aws_lambda.handler: set {' and '.join(missing)} in the Lambda's environment")
    routes = Routes(**{field: env.get(name) or None for field, name in LAMBDA_ENV.items()}, options=LAMBDA_ENV)
    parsed = parse_event(event)
    for problem in parsed.problems:
        log.warning("dropped malformed event part: %s", problem)
    for note in parsed.skipped:
        log.info("skipped: %s", note)
    requests = routes.plan(parsed.objects)
    summary: dict[str, Any] = {
        "started": [], "existing": [], "ignored": sum(1 for o in parsed.objects if routes.classify(o) is None),
        "skipped": list(parsed.skipped), "problems": list(parsed.problems),
    }
    if not requests:
        return summary
    api = PrefectApi(env["PREFECT_API_URL"], env.get("PREFECT_API_KEY") or None)
    deployment_id = api.deployment_id(env["STYLIZE_DEPLOYMENT"])
    for request in requests:
        flow_run, created = api.create_flow_run(deployment_id, request, tags=["stylize-events"])
        entry = {"flow_run_id": flow_run["id"], "manifest": request.manifest,
                 "idempotency_key": request.idempotency_key, "reason": request.reason}
        summary["started" if created else "existing"].append(entry)
        log.info("%s flow run %s for %s", "started" if created else "found existing", flow_run["id"], request.reason)
    return summary
