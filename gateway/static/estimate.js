// What a change would cost before it is sent: GET /jobs/{id}/estimate?clips=…, asked for once the
// choice of clips has settled (debounced) and kept per job, version, spend and clip set, so
// re-rendering the composer, typing or picking the same clips again asks nothing.

const SETTLE_MS = 250;
const RETRY_MS = 30000; // an estimate that could not be read is asked for again after this

export class Estimates {
  constructor(api) {
    this.api = api;
    this.cache = new Map(); // key → the estimate JSON, or {error, retryAt} when it could not be read
    this.timer = null;
    this.wanted = null;
    this.pending = null; // the key being waited for or read
  }

  // The key of an estimate: what the API's answer depends on (the budget left moves with the spend).
  static key(job, clips) {
    return `${job.id}|${job.current_version}|${job.total_cost}|${job.budget_limit}|${clips.join(",")}`;
  }

  // The estimate for ``clips`` of ``job`` if it is known; otherwise null, and ``onReady(key, result)``
  // is called once it is read (if no other clip set was asked for meanwhile).
  get(job, clips, onReady) {
    const key = Estimates.key(job, clips);
    this.wanted = key;
    const cached = this.cache.get(key);
    if (cached && cached.error && Date.now() > cached.retryAt) this.cache.delete(key);
    if (this.cache.has(key)) {
      clearTimeout(this.timer);
      this.pending = null;
      return this.cache.get(key);
    }
    if (this.pending === key) return null; // already on its way: renders meanwhile do not delay it
    clearTimeout(this.timer);
    this.pending = key;
    this.timer = setTimeout(() => this.load(job.id, clips, key, onReady), SETTLE_MS);
    return null;
  }

  async load(jobId, clips, key, onReady) {
    let result;
    try {
      result = await this.api.get(`/jobs/${jobId}/estimate?clips=${clips.join(",")}`);
    } catch (error) {
      result = { error, retryAt: Date.now() + RETRY_MS };
    }
    this.cache.set(key, result);
    if (this.cache.size > 100) this.cache.delete(this.cache.keys().next().value);
    if (this.pending === key) this.pending = null;
    if (this.wanted === key) onReady(key, result);
  }
}
