// ClipChat page: one job's video, its clips, chat-style regeneration with live progress.
// Plain JS, no framework, no network beyond this gateway.
"use strict";

(() => {
  const API = "/api/v1";
  const TOKEN_KEY = "clipchat-token";
  const MAX_TURNS = 20;
  const STAGES = {
    queued: "Waiting in line",
    rewriting: "Rewriting the prompt",
    generating: "Generating the new clip",
    downloading: "Fetching the clips",
    normalizing: "Preparing the clips",
    transitions: "Building transitions",
    encoding: "Encoding the video",
    muxing: "Adding the music",
    uploading: "Saving the video",
    publishing: "Publishing",
    done: "Done",
  };
  // How the new prompt was written, said plainly (no LLM is used without one configured).
  const REWRITERS = {
    template: "Prompt rewritten by a template (no LLM used).",
    llm: "Prompt rewritten by the LLM.",
    modifier: "No LLM configured: your instruction was added to the prompt as written.",
  };

  // Events after which the job JSON (video, clips, costs, history) is fetched again.
  const REFRESH_ON = [
    "job.created", "job.composed", "job.failed", "regeneration.queued", "regeneration.step",
    "regeneration.completed", "regeneration.failed", "regeneration.cancelled", "version.restored",
    "budget.warning",
  ];

  const $ = (id) => document.getElementById(id);
  const state = {
    token: null,
    jobs: [],
    job: null,
    regenerations: [],
    selectedClip: 0,
    shownVersion: null,
    events: null,
    refreshTimer: null,
    runStartedAt: null,
    videoRetryAt: 0,
  };

  class ApiError extends Error {
    constructor(status, body) {
      const error = (body && body.error) || {};
      super(error.message || `The server answered ${status}. Please try again.`);
      this.status = status;
      this.code = error.code || "http_error";
      this.retryable = Boolean(error.retryable);
    }
  }

  async function api(path, options = {}) {
    const headers = { Authorization: `Bearer ${state.token}`, ...(options.headers || {}) };
    let response;
    try {
      response = await fetch(API + path, { ...options, headers });
    } catch {
      throw new ApiError(0, { error: { message: "Cannot reach ClipChat. Check your connection.", retryable: true } });
    }
    const body = await response.json().catch(() => null);
    if (!response.ok) {
      const error = new ApiError(response.status, body);
      if (response.status === 401) signOut(error.message);
      throw error;
    }
    return body;
  }

  const postJson = (path, body) => api(path, {
    method: "POST",
    headers: { "Content-Type": "application/json" },
    body: JSON.stringify(body || {}),
  });

  // --- small helpers -------------------------------------------------------------------------

  function el(tag, attrs = {}, ...children) {
    const node = document.createElement(tag);
    for (const [key, value] of Object.entries(attrs)) {
      if (key === "class") node.className = value;
      else if (key.startsWith("on")) node.addEventListener(key.slice(2), value);
      else if (value !== null && value !== undefined && value !== false) node.setAttribute(key, value);
    }
    for (const child of children) node.append(child);
    return node;
  }

  const money = (value) => `$${Number(value || 0).toFixed(2)}`;
  const when = (iso) => (iso ? new Date(iso).toLocaleString() : "");

  function notice(message) {
    const box = $("notice");
    box.textContent = message || "";
    box.hidden = !message;
  }

  function live(message) {
    $("live").textContent = message || "";
  }

  function formatEta(seconds) {
    if (!Number.isFinite(seconds) || seconds <= 0) return "";
    if (seconds < 60) return `about ${Math.ceil(seconds)} s left`;
    return `about ${Math.ceil(seconds / 60)} min left`;
  }

  // --- sign in / out ---------------------------------------------------------------------------

  function pageToken() {
    const meta = document.querySelector('meta[name="clipchat-token"]');
    return meta ? meta.getAttribute("content") : null;
  }

  function signOut(message) {
    localStorage.removeItem(TOKEN_KEY);
    state.token = null;
    state.eventsJob = null;
    clearTimeout(state.reconnectTimer);
    if (state.events) state.events.close();
    $("workspace").hidden = true;
    $("sign-out").hidden = true;
    document.querySelector(".job-picker").hidden = true;
    $("sign-in").hidden = false;
    notice(message || "");
    $("token-input").focus();
  }

  $("sign-in-form").addEventListener("submit", (event) => {
    event.preventDefault();
    const token = $("token-input").value.trim();
    if (!token) return;
    localStorage.setItem(TOKEN_KEY, token);
    $("token-input").value = "";
    start(token);
  });

  $("sign-out").addEventListener("click", () => signOut());

  // --- loading ---------------------------------------------------------------------------------

  async function start(token) {
    state.token = token;
    $("sign-in").hidden = true;
    $("sign-out").hidden = Boolean(pageToken());
    notice("");
    try {
      state.jobs = (await api("/jobs")).jobs;
    } catch (error) {
      notice(error.message);
      return;
    }
    if (!state.jobs.length) {
      notice("You have no videos yet. Create one with POST /api/v1/jobs (see /openapi.json).");
      return;
    }
    renderJobPicker();
    const wanted = new URLSearchParams(location.hash.slice(1)).get("job");
    const job = state.jobs.find((j) => j.id === wanted) || state.jobs[0];
    await openJob(job.id);
  }

  function renderJobPicker() {
    const select = $("job-select");
    select.replaceChildren(...state.jobs.map((job) =>
      el("option", { value: job.id }, job.title || `Video ${job.id.slice(0, 8)}`)));
    document.querySelector(".job-picker").hidden = state.jobs.length < 2;
  }

  $("job-select").addEventListener("change", (event) => openJob(event.target.value));

  async function openJob(jobId) {
    history.replaceState(null, "", `#job=${jobId}`);
    $("job-select").value = jobId;
    state.job = null;
    state.shownVersion = null;
    state.selectedClip = 0;
    await refresh(jobId);
    $("workspace").hidden = false;
    connectEvents(jobId);
  }

  async function refresh(jobId = state.job && state.job.id) {
    if (!jobId) return;
    try {
      const [job, regenerations] = await Promise.all([
        api(`/jobs/${jobId}`),
        api(`/jobs/${jobId}/regenerations`),
      ]);
      state.job = job;
      state.regenerations = regenerations.regenerations;
      render();
    } catch (error) {
      notice(error.message);
    }
  }

  function scheduleRefresh() {
    clearTimeout(state.refreshTimer);
    state.refreshTimer = setTimeout(() => refresh(), 250);
  }

  // --- rendering -------------------------------------------------------------------------------

  function render() {
    const job = state.job;
    $("job-title").textContent = job.title || "Your video";
    const badge = $("job-status");
    badge.textContent = job.status;
    badge.className = `badge ${job.status}`;
    notice(job.error && job.status === "failed" ? job.error.message : "");
    renderVideo(job);
    renderClips(job);
    renderBudget(job);
    renderVersions(job);
    renderHistory();
    renderRunState(job);
  }

  function renderVideo(job) {
    const video = $("video");
    $("video-empty").hidden = Boolean(job.video_url);
    video.hidden = !job.video_url;
    if (job.video_url && state.shownVersion !== job.current_version) {
      const wasShown = state.shownVersion !== null;
      state.shownVersion = job.current_version;
      video.src = job.video_url;
      video.load();
      if (wasShown) live(`Now showing version ${job.current_version}.`);
    }
  }

  function renderClips(job) {
    if (state.selectedClip >= job.clips.length) state.selectedClip = 0;
    $("clips").replaceChildren(...job.clips.map((clip) => {
      const selected = clip.index === state.selectedClip;
      const image = clip.thumbnail_url
        ? el("img", { src: clip.thumbnail_url, alt: "", loading: "lazy" })
        : el("span", { class: "thumb-placeholder", "aria-hidden": "true" }, String(clip.index + 1));
      return el("li", {},
        el("button", {
          type: "button", class: "clip", "aria-pressed": String(selected),
          title: clip.prompt, onclick: () => selectClip(clip.index),
        },
        image,
        el("span", { class: "clip-index" }, `Clip ${clip.index + 1}`),
        el("span", { class: "clip-prompt" }, clip.prompt)));
    }));
    const current = job.clips.find((c) => c.index === state.selectedClip);
    $("selected-clip").textContent = current ? `clip ${current.index + 1}` : "a clip";
  }

  // Media URLs expire; when the video cannot load, fetch the job again for a fresh URL (not in a loop).
  $("video").addEventListener("error", () => {
    if (!state.job || Date.now() - state.videoRetryAt < 30000) return;
    state.videoRetryAt = Date.now();
    state.shownVersion = null;
    scheduleRefresh();
  });

  function selectClip(index) {
    state.selectedClip = index;
    renderClips(state.job);
    $("instruction").focus();
  }

  function renderBudget(job) {
    $("cost").textContent = money(job.total_cost);
    $("budget").textContent = money(job.budget_limit);
    $("budget-meter").value = Math.min(1, job.budget_used_fraction);
    $("budget-warning").hidden = !job.budget_warning;
  }

  function renderVersions(job) {
    const running = Boolean(job.active_regeneration_id);
    $("versions").replaceChildren(...job.versions.slice().reverse().map((version) => {
      const current = version.version === job.current_version;
      return el("li", { class: current ? "current" : "" },
        el("span", {}, `Version ${version.version}`,
          el("span", { class: "hint" }, ` · ${version.duration.toFixed(1)} s · ${when(version.created_at)}`)),
        current
          ? el("span", { class: "badge completed" }, "current")
          : el("button", {
            type: "button", class: "quiet", disabled: running,
            onclick: () => restore(version.version),
          }, "Restore"));
    }));
  }

  function renderHistory() {
    const rows = state.regenerations;
    $("history-empty").hidden = rows.length > 0;
    $("history").replaceChildren(...rows.map((r) => {
      const steps = r.step_costs;
      return el("li", {},
        el("div", { class: "history-head" },
          el("strong", {}, `Clip ${r.clip_index + 1}`),
          el("span", { class: `badge ${r.status}` }, r.status),
          el("span", { class: "hint" }, money(r.cost))),
        el("p", { class: "instruction" }, `“${r.instruction}”`),
        r.change_summary ? el("p", { class: "hint" }, r.change_summary) : "",
        r.rewriter ? el("p", { class: "hint rewriter" }, REWRITERS[r.rewriter] || "") : "",
        r.modified_prompt ? el("p", { class: "hint prompt" }, `New prompt: ${r.modified_prompt}`) : "",
        r.error && r.status !== "cancelled" ? el("p", { class: "error-text" }, r.error.message) : "",
        el("p", { class: "hint" },
          `LLM ${money(steps.llm)} · generation ${money(steps.generation)} · ` +
          `composition ${money(steps.composition)} · ${when(r.created_at)}`));
    }));
  }

  function renderRunState(job) {
    const running = job.status === "regenerating" || Boolean(job.active_regeneration_id);
    $("regenerate").disabled = running || job.status === "composing";
    $("cancel").hidden = !job.active_regeneration_id;
    $("progress-box").hidden = !running && job.status !== "composing";
    if (running || job.status === "composing") {
      const active = state.regenerations.find((r) => r.id === job.active_regeneration_id);
      if (active && active.stage) showProgress(active.stage, active.progress, null);
    } else {
      state.runStartedAt = null;
    }
  }

  function isRunning() {
    const job = state.job;
    const busy = job && (job.active_regeneration_id || job.status === "composing" || job.status === "regenerating");
    return Boolean(busy) || state.runStartedAt !== null;
  }

  function showProgress(stage, fraction, etaSeconds) {
    $("progress-box").hidden = false;
    $("stage").textContent = STAGES[stage] || stage || "Working";
    $("progress").value = Math.max(0, Math.min(1, fraction || 0));
    if (!state.runStartedAt) state.runStartedAt = Date.now();
    let eta = etaSeconds;
    if (!eta && fraction > 0.05 && fraction < 1) {
      const elapsed = (Date.now() - state.runStartedAt) / 1000;
      eta = (elapsed / fraction) * (1 - fraction);
    }
    $("eta").textContent = formatEta(eta);
  }

  // --- live events -----------------------------------------------------------------------------

  // The EventSource URL carries a ticket valid for a minute, never the API token. EventSource
  // would reconnect with the same URL (and a stale ticket), so the page reconnects itself: a fresh
  // ticket each time, resuming after the last event it saw.
  const RECONNECT_MS = 2000;

  function connectEvents(jobId) {
    if (state.events) state.events.close();
    clearTimeout(state.reconnectTimer);
    state.eventsJob = jobId;
    state.lastEventId = null;
    openEvents(jobId);
  }

  function reconnectEvents(jobId) {
    clearTimeout(state.reconnectTimer);
    state.reconnectTimer = setTimeout(() => {
      if (state.eventsJob === jobId && state.token) openEvents(jobId);
    }, RECONNECT_MS);
  }

  async function openEvents(jobId) {
    let ticket;
    try {
      ticket = (await api(`/jobs/${jobId}/tickets`, { method: "POST" })).ticket;
    } catch (error) {
      if (state.eventsJob !== jobId || !state.token) return;
      live(error.message);
      if (error.retryable) reconnectEvents(jobId);
      return;
    }
    if (state.eventsJob !== jobId) return;
    const params = new URLSearchParams({ ticket });
    if (state.lastEventId) params.set("after", state.lastEventId);
    const source = new EventSource(`${API}/jobs/${jobId}/events?${params}`);
    state.events = source;
    const seen = (event) => { if (event.lastEventId) state.lastEventId = event.lastEventId; };
    source.addEventListener("progress", (event) => {
      seen(event);
      // The first connection replays the job's whole log; old progress of finished work is noise.
      if (!isRunning()) return;
      const data = JSON.parse(event.data);
      showProgress(data.stage, data.fraction, data.payload && data.payload.eta_seconds);
    });
    for (const type of REFRESH_ON) {
      source.addEventListener(type, (event) => { seen(event); onJobEvent(JSON.parse(event.data)); });
    }
    source.addEventListener("watch.error", (event) => {
      const error = JSON.parse(event.data);
      live(error.message);
      if (!error.retryable) {
        source.close();
        state.eventsJob = null;
      }
    });
    source.addEventListener("open", () => live(""));
    source.addEventListener("error", () => {
      source.close();
      if (state.events !== source || state.eventsJob !== jobId) return;
      live("Connection lost — reconnecting…");
      reconnectEvents(jobId);
    });
  }

  function onJobEvent(event) {
    const payload = event.payload || {};
    switch (event.type) {
      case "regeneration.queued":
        state.runStartedAt = Date.now();
        showProgress("queued", 0, null);
        break;
      case "regeneration.completed":
        live(`Done: version ${payload.version} is ready.`);
        break;
      case "regeneration.failed":
      case "job.failed":
        live(payload.message || "The change did not work. The previous video is kept.");
        break;
      case "regeneration.cancelled":
        live("Cancelled. The previous video is kept.");
        break;
      default:
        break;
    }
    scheduleRefresh();
  }

  // --- actions ---------------------------------------------------------------------------------

  function conversationFor(clipIndex) {
    const turns = [];
    const done = state.regenerations
      .filter((r) => r.clip_index === clipIndex && r.status === "completed")
      .reverse();
    for (const r of done) {
      turns.push({ role: "user", content: r.instruction.slice(0, 4000) });
      const reply = r.change_summary || r.modified_prompt;
      if (reply) turns.push({ role: "assistant", content: reply.slice(0, 4000) });
    }
    return turns.slice(-MAX_TURNS);
  }

  $("instruction").addEventListener("input", (event) => {
    $("instruction-count").textContent = `${event.target.value.length} / 2000`;
  });

  $("regenerate-form").addEventListener("submit", async (event) => {
    event.preventDefault();
    const instruction = $("instruction").value.trim();
    if (!instruction) {
      live("Write what should change first.");
      return;
    }
    const button = $("regenerate");
    button.disabled = true;
    try {
      const accepted = await postJson(
        `/jobs/${state.job.id}/clips/${state.selectedClip}/regenerate`,
        { instruction, conversation_history: conversationFor(state.selectedClip) },
      );
      $("instruction").value = "";
      $("instruction-count").textContent = "0 / 2000";
      state.runStartedAt = Date.now();
      showProgress("queued", 0, null);
      live(`Queued. Estimated cost ${money(accepted.estimated_cost)}.` +
        (accepted.budget_warning ? " This brings the video near its budget." : ""));
      scheduleRefresh();
    } catch (error) {
      live(error.message);
      button.disabled = false;
    }
  });

  $("cancel").addEventListener("click", async () => {
    const id = state.job && state.job.active_regeneration_id;
    if (!id) return;
    try {
      await postJson(`/jobs/${state.job.id}/regenerations/${id}/cancel`);
      live("Cancelled. The previous video is kept.");
    } catch (error) {
      live(error.message);
    }
    scheduleRefresh();
  });

  async function restore(version) {
    try {
      state.job = await postJson(`/jobs/${state.job.id}/versions/${version}/restore`);
      render();
    } catch (error) {
      live(error.message);
    }
  }

  // --- start -----------------------------------------------------------------------------------

  const token = pageToken() || localStorage.getItem(TOKEN_KEY);
  if (token) start(token);
  else signOut();
})();
