"""Embedded mode end to end: one clip regenerated, then the two versions compared and the usage read."""

from __future__ import annotations

from decimal import Decimal

from tests.e2e.conftest import RunningClipChat, wait_for_job

CLIP = 3


def test_compare_names_exactly_the_regenerated_clip_and_usage_adds_up_to_the_total(
        embedded: RunningClipChat) -> None:
    with embedded.client() as client:
        oldest = client.get("/api/v1/jobs").json()["jobs"][-1]  # the demo job
        job = wait_for_job(client, oldest["id"], {"completed", "failed"})
        before_version = job["current_version"]
        before_prompts = {c["index"]: c["prompt"] for c in job["clips"]}
        started = client.post(f"/api/v1/jobs/{job['id']}/clips/{CLIP}/regenerate",
                              json={"instruction": "make it nighttime"})
        assert started.status_code == 202, started.text
        regeneration_id = started.json()["regeneration_id"]
        after = wait_for_job(client, job["id"], {"completed", "failed"})
        assert after["status"] == "completed" and after["active_regeneration_id"] is None, after
        after_version = after["current_version"]
        assert after_version > before_version
        [made] = [r for r in client.get(f"/api/v1/jobs/{job['id']}/regenerations").json()["regenerations"]
                  if r["id"] == regeneration_id]
        assert made["status"] == "completed" and Decimal(made["cost"]) > 0

        compared = client.get(f"/api/v1/jobs/{job['id']}/versions/{before_version}/compare/{after_version}")
        assert compared.status_code == 200, compared.text
        body = compared.json()
        [clip] = body["clips"]  # exactly the regenerated clip differs
        assert clip["index"] == CLIP
        assert clip["prompt_before"] == before_prompts[CLIP]
        assert clip["prompt_after"] == after["clips"][CLIP]["prompt"] == made["modified_prompt"]
        assert "night" in clip["prompt_after"]
        assert clip["revision_after"] == clip["revision_before"] + 1
        assert clip["video_url_before"] and clip["video_url_after"]
        publishing = [c for c in body["changes"] if c["version"] is not None]
        assert [(c["id"], c["version"], c["cost"], c["instruction"]) for c in publishing] == [
            (regeneration_id, after_version, made["cost"], "make it nighttime")]
        # Anything else between the two versions was an attempt that published nothing.
        assert all(c["status"] in ("failed", "cancelled") for c in body["changes"] if c["version"] is None)
        assert Decimal(body["cost"]) == sum(Decimal(c["cost"]) for c in body["changes"])
        assert client.get(f"/api/v1/jobs/{job['id']}/versions/{after_version}/compare/{after_version}"
                          ).status_code == 422
        assert client.get(f"/api/v1/jobs/{job['id']}/versions/1/compare/{after_version + 1}").status_code == 404

        usage = client.get(f"/api/v1/jobs/{job['id']}/usage").json()
        total = Decimal(client.get(f"/api/v1/jobs/{job['id']}").json()["total_cost"])
        assert Decimal(usage["total_cost"]) == total
        assert sum(Decimal(v) for v in usage["spend_by_step"].values()) == total
        for step, paid in (("rewrite", "llm"), ("generate", "generation"), ("compose", "composition")):
            assert Decimal(usage["spend_by_step"][step]) >= Decimal(made["step_costs"][paid]), step
        assert usage["changes"]["completed"] >= 1 and usage["changes"]["running"] == 0
        stages = {s["stage"] for s in usage["median_seconds_by_stage"]}
        assert {"queued", "generating"} <= stages
        assert usage["median_change_seconds"] > 0
        everything = client.get("/api/v1/usage").json()
        assert everything["jobs"] >= 1 and Decimal(everything["total_cost"]) >= total

    shown = embedded.cli("compare", job["id"], str(before_version), str(after_version))
    assert shown.returncode == 0, shown.stderr
    assert shown.stdout.startswith(f"version {before_version} -> {after_version}: 1 clip(s) differ")
    assert f"after:  {clip['prompt_after']}" in shown.stdout
    spent = embedded.cli("usage", job["id"])
    assert spent.returncode == 0, spent.stderr
    assert spent.stdout.splitlines()[0] == f"usage of job {job['id']}: total ${usage['total_cost']}"
    refused = embedded.cli("compare", job["id"], "1", "1")
    assert refused.returncode == 1 and refused.stderr.startswith("error: ") and len(refused.stderr.splitlines()) == 1
