"""The clips of a job are the ones the status service sends (the current version's), by index.

The status service (``current_clips``) sends one clip per index: the revision the current version
uses, which after a restore is not the highest. The gateway shows those as they are, in timeline order.
"""

from __future__ import annotations

import httpx

from tests.unit.gateway.gateway_rig import Backend, make_job


async def test_the_clips_sent_are_shown_in_timeline_order_as_they_are(client: httpx.AsyncClient,
                                                                      backend: Backend) -> None:
    job = make_job("alice", clips=3)
    # After a restore: clip 1 is back at revision 0 (the status service holds later ones too).
    revisions = {0: 2, 1: 0, 2: 1}
    for clip in job.clips:
        clip.revision = revisions[clip.clip_index]
    shuffled = [job.clips[2], job.clips[0], job.clips[1]]
    del job.clips[:]
    job.clips.extend(shuffled)
    backend.status.add_job(job)
    assert [c.clip_index for c in job.clips] == [2, 0, 1]
    for path, key in [(f"/api/v1/jobs/{job.job_id}", "clips"), (f"/api/v1/jobs/{job.job_id}/clips", "clips")]:
        clips = (await client.get(path)).json()[key]
        assert [(c["index"], c["revision"], c["prompt"]) for c in clips] == [
            (0, 2, "prompt 0"), (1, 0, "prompt 1"), (2, 1, "prompt 2")], path
