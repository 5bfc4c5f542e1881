"""The OpenAPI document: what FastAPI makes of the routes, plus what their signatures cannot say.

- The ``manifest`` part of ``POST /jobs`` is JSON of ``JobManifest``: its schema goes under
  ``components`` and the part's encoding says ``application/json``, so clients and test generators
  send manifests the server can read (FastAPI documents only the parameters it parses itself, and
  ``create_job`` reads its multipart body as a stream).
- Links lead from a job (created, fetched or restored) and from a started regeneration to the
  operations on them, so a client or a stateful test follows ids without reading prose.
"""

from __future__ import annotations

from typing import Any

from gateway.schemas import JobManifest

_JOB = "/api/v1/jobs/{job_id}"
_REGENERATIONS = f"{_JOB}/regenerations"


def complete_document(document: dict[str, Any]) -> dict[str, Any]:
    """Add the manifest schema and the links to the document FastAPI generated (in place)."""
    _add_manifest_schema(document)
    _no_null_parameters(document)
    _add_links(document)
    return document


def _no_null_parameters(document: dict[str, Any]) -> None:
    """An optional query or header parameter is left out to say "none": it is never ``null``.

    FastAPI documents ``X | None = None`` as ``anyOf: [X, {type: null}]``, which a client reads as
    permission to send the text "null" (``?after=null``, ``Last-Event-ID: null``), a 422 here.
    """
    for operations in document["paths"].values():
        for operation in operations.values():
            for parameter in operation.get("parameters", []):
                schema = parameter.get("schema", {})
                branches = [b for b in schema.get("anyOf", []) if b != {"type": "null"}]
                if len(branches) == 1 and len(schema["anyOf"]) == 2:
                    rest = {k: v for k, v in schema.items() if k != "anyOf"}
                    parameter["schema"] = {**branches[0], **rest}


def _add_manifest_schema(document: dict[str, Any]) -> None:
    schema = JobManifest.model_json_schema(ref_template="#/components/schemas/{model}")
    components = document.setdefault("components", {}).setdefault("schemas", {})
    for name, definition in {**schema.pop("$defs", {}), JobManifest.__name__: schema}.items():
        if components.setdefault(name, definition) != definition:
            raise ValueError(f"two different schemas are named {name} in the OpenAPI document")


def _operation_ref(path: str, method: str) -> str:
    return "#/paths/" + path.replace("~", "~0").replace("/", "~1") + "/" + method


def _link(path: str, method: str, description: str, **parameters: str) -> dict[str, Any]:
    return {"operationRef": _operation_ref(path, method), "parameters": parameters,
            "description": description}


def _job_links(job_id: str) -> dict[str, Any]:
    """Links from an answer that carries a job (``JobOut``) whose id is at ``job_id``."""
    return {
        "GetJob": _link(_JOB, "get", "The job.", job_id=job_id),
        "ListClips": _link(f"{_JOB}/clips", "get", "Its clips.", job_id=job_id),
        "ListVersions": _link(f"{_JOB}/versions", "get", "Its video versions.", job_id=job_id),
        "ListRegenerations": _link(_REGENERATIONS, "get", "Its regeneration history.", job_id=job_id),
        "CreateTicket": _link(f"{_JOB}/tickets", "post", "A ticket for its event stream.", job_id=job_id),
        "WatchEvents": _link(f"{_JOB}/events", "get", "Its live events.", job_id=job_id),
        "RegenerateFirstClip": _link(f"{_JOB}/clips/{{clip_index}}/regenerate", "post",
                                     "Change its first clip.", job_id=job_id,
                                     clip_index="$response.body#/clips/0/index"),
    }


def _add_links(document: dict[str, Any]) -> None:
    from_job = _job_links("$response.body#/id")
    links: dict[tuple[str, str, str], dict[str, Any]] = {
        ("/api/v1/jobs", "post", "202"): from_job,
        (_JOB, "get", "200"): from_job,
        (f"{_JOB}/versions/{{version}}/restore", "post", "200"): from_job,
        ("/api/v1/jobs", "get", "200"): {"GetFirstJob": _link(_JOB, "get", "The newest job on the page.",
                                                              job_id="$response.body#/jobs/0/id")},
        (f"{_JOB}/versions", "get", "200"): {
            "RestoreFirstVersion": _link(f"{_JOB}/versions/{{version}}/restore", "post",
                                         "Make the first version current again.",
                                         job_id="$request.path.job_id",
                                         version="$response.body#/versions/0/version")},
        (f"{_JOB}/clips/{{clip_index}}/regenerate", "post", "202"): {
            "CancelRegeneration": _link(f"{_REGENERATIONS}/{{regeneration_id}}/cancel", "post",
                                        "Cancel this regeneration.", job_id="$request.path.job_id",
                                        regeneration_id="$response.body#/regeneration_id"),
            "ListRegenerations": _link(_REGENERATIONS, "get", "The job's regeneration history.",
                                       job_id="$request.path.job_id"),
            "GetJob": _link(_JOB, "get", "The job, with its active regeneration.",
                            job_id="$request.path.job_id"),
            "WatchEvents": _link(f"{_JOB}/events", "get", "The regeneration's progress.",
                                 job_id="$request.path.job_id"),
        },
        (_REGENERATIONS, "get", "200"): {
            "CancelNewestRegeneration": _link(f"{_REGENERATIONS}/{{regeneration_id}}/cancel", "post",
                                              "Cancel the newest regeneration.",
                                              job_id="$request.path.job_id",
                                              regeneration_id="$response.body#/regenerations/0/id")},
    }
    for (path, method, status), named in links.items():
        response = document["paths"][path][method]["responses"][status]
        response.setdefault("links", {}).update(named)
