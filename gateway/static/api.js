// The gateway's REST API and its Server-Sent Events, as the page uses them.

export const API = "/api/v1";

export class ApiError extends Error {
  constructor(status, body) {
    const error = (body && body.error) || {};
    super(error.message || `The server answered ${status}. Please try again.`);
    this.status = status;
    this.code = error.code || (status ? `http_${status}` : "network");
    this.retryable = Boolean(error.retryable);
  }
}

export class Api {
  constructor(token, onUnauthorized) {
    this.token = token;
    this.onUnauthorized = onUnauthorized;
  }

  async request(path, options = {}) {
    const headers = { Authorization: `Bearer ${this.token}`, ...(options.headers || {}) };
    let response;
    try {
      response = await fetch(API + path, { ...options, headers });
    } catch {
      throw new ApiError(0, { error: { message: "Cannot reach ClipChat. Check your connection.", retryable: true } });
    }
    const body = await response.json().catch(() => null);
    if (!response.ok) {
      const error = new ApiError(response.status, body);
      if (response.status === 401) this.onUnauthorized(error.message);
      throw error;
    }
    return body;
  }

  get(path) {
    return this.request(path);
  }

  post(path, body) {
    return this.request(path, {
      method: "POST",
      headers: { "Content-Type": "application/json" },
      body: JSON.stringify(body || {}),
    });
  }
}

// One EventSource per job. Its URL carries a ticket valid for a minute, never the API token, and
// EventSource would reconnect with the same (stale) ticket, so this reconnects itself: a fresh
// ticket each time, resuming after the last event it saw (kept for the tab, so a reload resumes too).
const RECONNECT_MS = [1000, 2000, 4000, 8000];

export class JobEvents {
  constructor(api, jobId, { onEvent, onConnection }) {
    this.api = api;
    this.jobId = jobId;
    this.onEvent = onEvent;
    this.onConnection = onConnection;
    this.source = null;
    this.timer = null;
    this.failures = 0;
    this.closed = false;
    this.storageKey = `clipchat-last-event:${jobId}`;
    this.lastEventId = sessionStorage.getItem(this.storageKey);
  }

  open() {
    this.closed = false;
    this.connect();
  }

  close() {
    this.closed = true;
    clearTimeout(this.timer);
    if (this.source) this.source.close();
    this.source = null;
  }

  async connect() {
    let ticket;
    try {
      ticket = (await this.api.request(`/jobs/${this.jobId}/tickets`, { method: "POST" })).ticket;
    } catch (error) {
      if (this.closed) return;
      if (error.status === 401 || error.status === 404) {
        this.onConnection("failed", error.message);
        return;
      }
      this.retry();
      return;
    }
    if (this.closed) return;
    const params = new URLSearchParams({ ticket });
    if (this.lastEventId) params.set("after", this.lastEventId);
    const source = new EventSource(`${API}/jobs/${this.jobId}/events?${params}`);
    this.source = source;
    const deliver = (event) => {
      if (this.source !== source) return;
      if (event.lastEventId) {
        this.lastEventId = event.lastEventId;
        sessionStorage.setItem(this.storageKey, event.lastEventId);
      }
      let data;
      try {
        data = JSON.parse(event.data);
      } catch {
        return;
      }
      this.onEvent(data);
    };
    source.addEventListener("message", deliver);
    for (const type of EVENT_TYPES) source.addEventListener(type, deliver);
    source.addEventListener("watch.error", (event) => {
      let error = {};
      try { error = JSON.parse(event.data); } catch { /* keep the default */ }
      if (!error.retryable) {
        this.close();
        this.onConnection("failed", error.message || "Live updates stopped.");
      }
    });
    source.addEventListener("open", () => {
      if (this.source !== source) return;
      const recovered = this.failures > 0;
      this.failures = 0;
      this.onConnection("open", recovered);
    });
    source.addEventListener("error", () => {
      source.close();
      if (this.source !== source || this.closed) return;
      this.retry();
    });
  }

  retry() {
    this.failures += 1;
    this.onConnection("reconnecting");
    clearTimeout(this.timer);
    const wait = RECONNECT_MS[Math.min(this.failures - 1, RECONNECT_MS.length - 1)];
    this.timer = setTimeout(() => { if (!this.closed) this.connect(); }, wait);
  }
}

const EVENT_TYPES = [
  "progress", "job.created", "job.composed", "job.failed", "regeneration.queued", "regeneration.step",
  "regeneration.completed", "regeneration.failed", "regeneration.cancelled", "version.restored",
  "budget.warning",
];
