// ClipChat page: one job's video, its clips, and a chat per clip to change it.
// Plain ES modules, no framework, no network beyond this gateway.
import { Api, JobEvents } from "/static/api.js";
import { Compare } from "/static/compare.js";
import { $, el, money, when, clock, formatEta, reconcile } from "/static/dom.js";
import { Estimates } from "/static/estimate.js";
import { UsageChart } from "/static/usage.js";

const TOKEN_KEY = "clipchat-token";
const MAX_TURNS = 20;
const MAX_INSTRUCTION = 2000;
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
  template: "Rewritten by a template (no LLM used).",
  llm: "Rewritten by the LLM.",
  modifier: "No LLM configured: your words were added to the prompt as written.",
};
const STATUS_WORDS = {
  composing: "Composing", completed: "Completed", regenerating: "Regenerating", failed: "Failed",
  unknown: "Unknown",
};
// Job events after which the job and its history are read again (progress is applied in place).
const REFRESH_ON = new Set([
  "job.created", "job.composed", "job.failed", "regeneration.queued", "regeneration.step",
  "regeneration.completed", "regeneration.failed", "regeneration.cancelled", "version.restored",
  "budget.warning",
]);
const RUNNING = new Set(["queued", "running"]);

const state = {
  api: null,
  jobs: [],
  job: null,
  regenerations: [],
  selectedClip: 0,
  shownVersion: null,
  events: null,
  refreshTimer: null,
  refreshing: null,
  pending: null, // {clipIndex, instruction, at} while the POST is on its way
  notes: [], // messages of this page only (refusals): {id, clipIndex, kind, title, text, at, retry}
  progress: null, // {regenerationId, stage, fraction, eta}: the whole change's
  clipProgress: new Map(), // regeneration id → {stage, fraction}: each clip's own, in a change of several
  clipProgressFrame: 0,
  runStartedAt: null,
  progressFrame: 0,
  videoRetryAt: 0,
  connection: "open",
  estimateTimer: null,
  usage: null, // the usage chart beside the budget
  compareAsked: 0, // the latest read of which clips differ between the compared versions
  estimates: null, // what a change of the chosen clips would cost, read before it is sent
  overBudget: null, // the reason Send is off when the estimate does not fit the budget left
};
const compare = new Compare();

// --- sign in / out -----------------------------------------------------------------------------

function pageToken() {
  const meta = document.querySelector('meta[name="clipchat-token"]');
  return meta ? meta.getAttribute("content") : null;
}

function signOut(message) {
  localStorage.removeItem(TOKEN_KEY);
  if (state.events) state.events.close();
  state.events = null;
  state.api = null;
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

function notice(message) {
  const box = $("notice");
  box.textContent = message || "";
  box.hidden = !message;
}

// --- loading -----------------------------------------------------------------------------------

async function start(token) {
  state.api = new Api(token, signOut);
  state.usage = new UsageChart(state.api, STAGES);
  state.estimates = new Estimates(state.api);
  $("sign-in").hidden = true;
  $("workspace").hidden = false;
  $("sign-out").hidden = Boolean(pageToken());
  notice("");
  try {
    state.jobs = (await state.api.get("/jobs")).jobs;
  } catch (error) {
    notice(error.message);
    return;
  }
  if (!state.jobs.length) {
    $("workspace").hidden = true;
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
  if (state.events) state.events.close();
  Object.assign(state, {
    job: null, regenerations: [], shownVersion: null, pending: null, notes: [], progress: null,
    runStartedAt: null, clipProgress: new Map(),
  });
  state.selectedClip = Number(sessionStorage.getItem(`clipchat-clip:${jobId}`) || 0);
  compare.close();
  await refresh(jobId);
  $("workspace").setAttribute("aria-busy", "false");
  state.events = new JobEvents(state.api, jobId, { onEvent, onConnection });
  state.events.open();
}

async function refresh(jobId = state.job && state.job.id) {
  if (!jobId || !state.api) return;
  // One read at a time; a refresh asked for meanwhile runs once after it.
  if (state.refreshing) {
    state.refreshAgain = true;
    return;
  }
  state.refreshing = (async () => {
    try {
      const [job, regenerations] = await Promise.all([
        state.api.get(`/jobs/${jobId}`),
        state.api.get(`/jobs/${jobId}/regenerations`),
      ]);
      if (state.job && state.job.id !== jobId && state.job !== null) return;
      state.job = job;
      state.regenerations = regenerations.regenerations;
      if (state.pending && state.regenerations.some((r) => r.id === state.pending.regenerationId)) {
        state.pending = null;
      }
      render();
    } catch (error) {
      if (error.status !== 401) notice(error.message);
    }
  })();
  await state.refreshing;
  state.refreshing = null;
  if (state.refreshAgain) {
    state.refreshAgain = false;
    await refresh(jobId);
  }
}

function scheduleRefresh(delay = 150) {
  clearTimeout(state.refreshTimer);
  state.refreshTimer = setTimeout(() => refresh(), delay);
}

// --- live events -------------------------------------------------------------------------------

function onEvent(event) {
  if (event.type === "progress") {
    onProgress(event);
    return;
  }
  if (!REFRESH_ON.has(event.type)) return;
  const payload = event.payload || {};
  if (event.type === "regeneration.step") applyStep(payload);
  if (event.type === "regeneration.queued") {
    state.runStartedAt = Date.now();
    state.progress = { regenerationId: payload.regeneration_id, stage: "queued", fraction: 0, eta: null };
  }
  if (event.type === "regeneration.completed" || event.type === "regeneration.failed"
      || event.type === "regeneration.cancelled") {
    state.progress = null;
    state.runStartedAt = null;
  }
  scheduleRefresh();
}

// A rewrite's new prompt comes with its step event: shown at once, before the history is read again.
function applyStep(payload) {
  const row = state.regenerations.find((r) => r.id === payload.regeneration_id);
  if (!row || !payload.modified_prompt || row.modified_prompt === payload.modified_prompt) return;
  row.modified_prompt = payload.modified_prompt;
  row.rewriter = payload.rewriter || row.rewriter;
  row.change_summary = payload.change_summary || row.change_summary;
  renderThread();
}

function onProgress(event) {
  const payload = event.payload || {};
  const active = state.job && state.job.active_regeneration_id;
  // The log replays finished work on a first connection; only the running change's progress counts.
  if (!active || (payload.regeneration_id && payload.regeneration_id !== active)) return;
  // One clip's own progress in a change of several clips: its own bar; the change's bar is unmoved.
  if (payload.member_regeneration_id) {
    onClipProgress(payload.member_regeneration_id, event);
    return;
  }
  const previous = state.progress && state.progress.regenerationId === active ? state.progress : null;
  state.progress = {
    regenerationId: active,
    stage: event.stage || (previous && previous.stage) || "queued",
    fraction: Math.max(event.fraction || 0, previous ? previous.fraction : 0),
    eta: payload.eta_seconds || null,
  };
  if (!state.runStartedAt) state.runStartedAt = Date.now();
  const stageChanged = !previous || previous.stage !== state.progress.stage;
  // The rewritten prompt arrives with the step event; a new stage may change the bubble's text.
  if (stageChanged) renderThread();
  cancelAnimationFrame(state.progressFrame);
  state.progressFrame = requestAnimationFrame(updateProgress);
}

function onClipProgress(memberId, event) {
  const previous = state.clipProgress.get(memberId);
  state.clipProgress.set(memberId, {
    stage: event.stage || (previous && previous.stage) || "queued",
    fraction: Math.max(event.fraction || 0, previous ? previous.fraction : 0),
  });
  cancelAnimationFrame(state.clipProgressFrame);
  state.clipProgressFrame = requestAnimationFrame(updateClipProgress);
}

function onConnection(status, detail) {
  const banner = $("connection");
  state.connection = status;
  if (status === "reconnecting") {
    banner.textContent = "Reconnecting…";
    banner.hidden = false;
  } else if (status === "failed") {
    banner.textContent = detail || "Live updates stopped. Reload the page.";
    banner.hidden = false;
  } else {
    banner.hidden = true;
    banner.textContent = "";
    // Whatever happened while the stream was down is read from the job itself.
    if (detail) scheduleRefresh(0);
  }
  const note = document.querySelector("#run .run-note");
  if (note) note.hidden = status !== "reconnecting";
}

// --- rendering ---------------------------------------------------------------------------------

function render() {
  const job = state.job;
  $("job-title").textContent = job.title || "Your video";
  const badge = $("job-status");
  const word = STATUS_WORDS[job.status] || job.status;
  if (badge.textContent !== word) badge.textContent = word;
  badge.className = `badge ${job.status}`;
  notice("");
  if (!job.active_regeneration_id) {
    state.progress = null;
    state.runStartedAt = null;
    state.clipProgress.clear();
  } else {
    adoptRunProgress(job);
  }
  renderVideo(job);
  renderClips(job);
  renderThread();
  renderComposer();
  renderBudget(job);
  renderVersions(job);
}

// On a (re)load mid-run, the running change's last stage and fraction come from the job's state: a
// change of several clips has a row per clip, each with its own clip's progress, and its bar their mean.
function adoptRunProgress(job) {
  const active = state.regenerations.find((r) => r.id === job.active_regeneration_id);
  if (!active) return;
  const rows = activeRows();
  const fraction = rows.length > 1
    ? rows.reduce((sum, r) => sum + (r.progress || 0), 0) / rows.length : active.progress || 0;
  const laggard = rows.length > 1 ? rows.reduce((a, b) => ((b.progress || 0) < (a.progress || 0) ? b : a)) : active;
  const known = state.progress && state.progress.regenerationId === active.id ? state.progress : null;
  if (!known || fraction > known.fraction) {
    state.progress = {
      regenerationId: active.id,
      stage: laggard.stage || "queued",
      fraction: Math.max(fraction, known ? known.fraction : 0),
      eta: known ? known.eta : null,
    };
  }
  if (!state.runStartedAt) {
    state.runStartedAt = active.created_at ? Date.parse(active.created_at) : Date.now();
  }
}

function renderVideo(job) {
  const video = $("video");
  $("video-empty").hidden = Boolean(job.video_url);
  $("video-empty").textContent = job.status === "failed" && job.error
    ? `The video could not be composed: ${job.error.message}`
    : "The first version of this video is still being composed.";
  if (job.video_url && state.shownVersion !== job.current_version) {
    const wasShown = state.shownVersion !== null;
    state.shownVersion = job.current_version;
    video.src = job.video_url;
    video.load();
    $("now-showing").textContent = `Showing version ${job.current_version}` +
      (job.versions.length > 1 ? ` of ${job.versions.length}.` : ".");
    if (wasShown) announce(`Now showing version ${job.current_version}.`);
  }
}

// Media URLs expire; when the video cannot load, read the job again for a fresh URL (not in a loop).
$("video").addEventListener("error", () => {
  if (!state.job || !$("video").getAttribute("src") || Date.now() - state.videoRetryAt < 30000) return;
  state.videoRetryAt = Date.now();
  state.shownVersion = null;
  scheduleRefresh();
});

function renderClips(job) {
  if (state.selectedClip >= job.clips.length) state.selectedClip = 0;
  const changing = new Set(activeRows().map((r) => r.clip_index));
  const items = job.clips.map((clip) => {
    const selected = clip.index === state.selectedClip;
    const busy = changing.has(clip.index);
    // The thumbnail node is kept while its revision is the same: no reload, no layout shift.
    const sig = `${clip.revision}|${selected}|${busy}|${clip.prompt}|${Boolean(clip.thumbnail_url)}`;
    return { key: `clip-${clip.index}`, sig, build: () => clipItem(clip, selected, busy) };
  });
  const strip = $("clips");
  reconcile(strip, items);
  // Keep the selected clip in view inside the strip (never scrolling the page itself).
  const chosen = strip.querySelector('button[aria-pressed="true"]');
  if (chosen && chosen.parentElement !== state.shownClipItem) {
    state.shownClipItem = chosen.parentElement;
    const item = chosen.parentElement;
    if (item.offsetLeft < strip.scrollLeft || item.offsetLeft + item.offsetWidth > strip.scrollLeft + strip.clientWidth) {
      strip.scrollLeft = item.offsetLeft - (strip.clientWidth - item.offsetWidth) / 2;
    }
  }
  const current = job.clips.find((c) => c.index === state.selectedClip);
  $("chat-title").textContent = current ? `Chat about clip ${current.index + 1}` : "Chat";
  $("chat-prompt").textContent = current ? `Now: “${current.prompt}”` : "";
  $("instruction-label").textContent = current ? `What should change in clip ${current.index + 1}?`
    : "What should change?";
}

function clipItem(clip, selected, busy) {
  const thumb = el("span", { class: "thumb" });
  const placeholder = el("span", { class: "thumb-placeholder", "aria-hidden": "true" }, String(clip.index + 1));
  if (clip.thumbnail_url) {
    const image = el("img", {
      src: clip.thumbnail_url, alt: "", loading: "lazy", decoding: "async", width: "160", height: "90",
    });
    image.addEventListener("error", () => image.replaceWith(placeholder), { once: true });
    thumb.append(image);
  } else {
    thumb.append(placeholder);
  }
  const label = `Clip ${clip.index + 1}, ${clip.duration.toFixed(1)} seconds: ${clip.prompt}` +
    (busy ? ". Being changed now." : "");
  return el("li", {},
    el("button", {
      type: "button", class: `clip${busy ? " regenerating" : ""}`, "aria-pressed": String(selected),
      "aria-label": label, title: clip.prompt, "data-index": String(clip.index),
      onclick: () => selectClip(clip.index, true),
    },
    thumb,
    busy ? el("span", { class: "clip-flag", "aria-hidden": "true" }, "Changing…") : "",
    el("span", { class: "clip-meta", "aria-hidden": "true" },
      el("span", { class: "clip-index" }, `Clip ${clip.index + 1}`),
      el("span", { class: "clip-duration" }, `${clip.duration.toFixed(1)} s`)),
    el("span", { class: "clip-prompt", "aria-hidden": "true" }, clip.prompt)));
}

// Arrow keys move along the clip strip.
$("clips").addEventListener("keydown", (event) => {
  if (!state.job || !["ArrowLeft", "ArrowRight", "Home", "End"].includes(event.key)) return;
  const last = state.job.clips.length - 1;
  const next = { ArrowLeft: state.selectedClip - 1, ArrowRight: state.selectedClip + 1, Home: 0, End: last }[event.key];
  event.preventDefault();
  selectClip(Math.max(0, Math.min(last, next)), false);
  const button = $("clips").querySelector(`button[data-index="${state.selectedClip}"]`);
  if (button) {
    button.focus();
    button.scrollIntoView({ block: "nearest", inline: "nearest" });
  }
});

function selectClip(index, focusChat) {
  if (!state.job) return;
  state.selectedClip = index;
  sessionStorage.setItem(`clipchat-clip:${state.job.id}`, String(index));
  renderClips(state.job);
  renderThread();
  renderComposer();
  if (focusChat) $("instruction").focus({ preventScroll: window.innerWidth >= 960 });
}

function activeRegeneration() {
  const job = state.job;
  if (!job || !job.active_regeneration_id) return null;
  return state.regenerations.find((r) => r.id === job.active_regeneration_id) || null;
}

// A change of several clips has a row per clip; its id is its first clip's row's.
function changeOf(r) {
  return r.change_id || r.id;
}

// The rows of the running change (one per clip it changes).
function activeRows() {
  const job = state.job;
  if (!job || !job.active_regeneration_id) return [];
  return state.regenerations.filter((r) => changeOf(r) === job.active_regeneration_id);
}

// The clips one change changed (one, or several for a change of several clips).
function clipsOfChange(r) {
  const id = changeOf(r);
  return state.regenerations.filter((row) => changeOf(row) === id).map((row) => row.clip_index).sort((x, y) => x - y);
}

function clipList(indexes) {
  const numbers = indexes.map((i) => String(i + 1));
  return numbers.length === 1 ? `Clip ${numbers[0]}`
    : `Clips ${numbers.slice(0, -1).join(", ")} and ${numbers[numbers.length - 1]}`;
}

// --- the chat ----------------------------------------------------------------------------------

function renderThread() {
  if (!state.job) return;
  const clipIndex = state.selectedClip;
  const rows = state.regenerations.filter((r) => r.clip_index === clipIndex).slice().reverse();
  const entries = [];
  for (const r of rows) entries.push({ at: r.created_at || "", items: regenerationMessages(r) });
  for (const n of state.notes.filter((note) => note.clipIndex === clipIndex)) {
    const sig = n.conflict ? `note|${state.job.active_regeneration_id}` : "note";
    entries.push({ at: n.at, items: [{ key: n.id, sig, build: () => noteMessage(n) }] });
  }
  entries.sort((a, b) => (a.at < b.at ? -1 : a.at > b.at ? 1 : 0));
  const items = entries.flatMap((entry) => entry.items);
  const pending = state.pending;
  const arrived = pending && rows.some((r) => r.id === pending.regenerationId
    || (RUNNING.has(r.status) && r.instruction === pending.instruction));
  if (pending && pending.clipIndex === clipIndex && !arrived) {
    items.push({ key: "pending-user", sig: state.pending.instruction,
      build: () => userMessage(state.pending.instruction, state.pending.at, null) });
    items.push({ key: "pending-typing", sig: "typing", build: () => typingMessage("Sending your instruction") });
  }
  if (!items.length) {
    items.push({ key: "empty", sig: "empty", build: () => el("li", { class: "empty-thread" },
      "No changes to this clip yet. Tell me what to change, e.g. “make it nighttime”.") });
  }
  const thread = $("thread");
  const atBottom = thread.scrollHeight - thread.scrollTop - thread.clientHeight < 40;
  reconcile(thread, items);
  if (atBottom) thread.scrollTop = thread.scrollHeight;
  updateProgress();
  updateClipProgress();
}

function regenerationMessages(r) {
  const items = [{
    key: `${r.id}-user`, sig: `${r.estimated_cost}`,
    build: () => userMessage(r.instruction, r.created_at, r.estimated_cost),
  }];
  const running = RUNNING.has(r.status);
  if (running) {
    const rewriting = !r.modified_prompt;
    items.push({
      key: `${r.id}-run`, sig: `${r.modified_prompt}|${rewriting}|${r.rewriter}`,
      build: () => runningMessage(r, rewriting),
    });
  } else if (r.status === "completed") {
    items.push({ key: `${r.id}-done`, sig: `${r.cost}|${versionMadeBy(r)}|${state.job.current_version}`,
      build: () => successMessage(r) });
  } else if (r.status === "failed") {
    const dismissed = dismissedErrors().has(r.id);
    items.push({ key: `${r.id}-failed`, sig: `${dismissed}|${isLatest(r)}|${Boolean(state.job.active_regeneration_id)}`,
      build: () => failureMessage(r, dismissed) });
  } else if (r.status === "cancelled") {
    items.push({ key: `${r.id}-cancelled`, sig: r.cost, build: () => cancelledMessage(r) });
  }
  return items;
}

function userMessage(text, at, estimate) {
  return el("li", { class: "msg user" },
    el("div", { class: "bubble" }, text),
    el("span", { class: "msg-meta" }, [clock(at), estimate ? `estimated ${money(estimate)}` : ""]
      .filter(Boolean).join(" · ")));
}

function assistant(extraClass, ...children) {
  return el("li", { class: `msg assistant ${extraClass}` }, el("div", { class: "bubble" }, ...children));
}

function typingMessage(text) {
  return assistant("typing-msg",
    el("span", { class: "typing" }, el("span", {}, text),
      el("span", { class: "typing-dots", "aria-hidden": "true" }, el("i"), el("i"), el("i"))));
}

function rewrittenLine(r) {
  if (!r.modified_prompt) return "";
  const summary = r.change_summary && r.rewriter !== "modifier" ? r.change_summary : "";
  return el("div", {},
    summary ? el("p", {}, summary.endsWith(".") ? summary : `${summary}.`) : "",
    el("p", { class: "prompt-text" }, `New prompt: “${r.modified_prompt}”`),
    el("p", { class: "by" }, REWRITERS[r.rewriter] || "The prompt was rewritten."));
}

function runningMessage(r, rewriting) {
  const several = Boolean(r.change_id) && clipsOfChange(r).length > 1;
  const run = el("div", { class: "run", id: "run" },
    several ? el("p", { class: "run-title" }, `The whole change (${clipList(clipsOfChange(r)).toLowerCase()})`) : "",
    el("div", { class: "run-label" },
      el("span", { class: "run-stage", id: "run-stage" }, STAGES[r.stage] || "Working"),
      el("span", { class: "run-eta", id: "run-eta" })),
    el("progress", { id: "run-progress", max: "1", value: String(r.progress || 0),
      "aria-label": several ? "Progress of the whole change" : "Progress of this change" }),
    el("p", { class: "run-note", hidden: state.connection !== "reconnecting" }, "Reconnecting…"));
  const cancel = el("button", { type: "button", class: "danger small", onclick: () => cancelRun(changeOf(r)) }, "Cancel");
  return assistant("running",
    rewriting ? el("span", { class: "typing" }, el("span", {}, "Reading your instruction"),
      el("span", { class: "typing-dots", "aria-hidden": "true" }, el("i"), el("i"), el("i"))) : rewrittenLine(r),
    several ? clipRun(r) : "",
    run,
    el("div", { class: "actions" }, cancel));
}

// A clip's own bar in a change of several clips (its stage and fraction), above the change's.
function clipRun(r) {
  const own = clipProgressOf(r);
  return el("div", { class: "run clip-run", "data-member": r.id },
    el("div", { class: "run-label" },
      el("span", { class: "run-stage clip-run-stage" }, `Clip ${r.clip_index + 1}: ${STAGES[own.stage] || "Working"}`)),
    el("progress", { class: "clip-run-progress", max: "1", value: String(own.fraction),
      "aria-label": `Progress of clip ${r.clip_index + 1}` }));
}

// A clip's own progress: its row's (from the last read), or its own events' since, whichever is further.
function clipProgressOf(r) {
  const heard = state.clipProgress.get(r.id);
  const read = { stage: r.stage || "queued", fraction: r.progress || 0 };
  return heard && heard.fraction >= read.fraction ? heard : read;
}

function updateClipProgress() {
  for (const node of $("thread").querySelectorAll(".clip-run[data-member]")) {
    const row = state.regenerations.find((r) => r.id === node.dataset.member);
    if (!row) continue;
    const own = clipProgressOf(row);
    const text = `Clip ${row.clip_index + 1}: ${STAGES[own.stage] || own.stage || "Working"}`;
    const stage = node.querySelector(".clip-run-stage");
    if (stage.textContent !== text) stage.textContent = text;
    node.querySelector(".clip-run-progress").value = Math.max(0, Math.min(1, own.fraction));
  }
}

function versionMadeBy(r) {
  const version = state.job.versions.find((v) => v.created_by_regeneration_id === changeOf(r));
  return version ? version.version : null;
}

function costLine(r) {
  const steps = r.step_costs;
  return el("p", { class: "cost-line" },
    `Cost ${money(r.cost)} (estimated ${money(r.estimated_cost)}): prompt rewrite ${money(steps.llm)} · ` +
    `generation ${money(steps.generation)} · composition ${money(steps.composition)}`);
}

function successMessage(r) {
  const version = versionMadeBy(r);
  const current = version !== null && version === state.job.current_version;
  const actions = el("div", { class: "actions" });
  if (version !== null) {
    actions.append(el("button", { type: "button", class: "small", onclick: () => viewVersion(version) },
      current ? "View updated video" : `Play version ${version}`));
    const before = previousVersion(version);
    if (before !== null) {
      actions.append(el("button", {
        type: "button", class: "quiet small",
        onclick: () => compareVersions(before, version, r.clip_index),
      }, "Compare before and after"));
    }
  }
  return assistant("success",
    el("p", { class: "msg-title" }, version !== null
      ? `Done: clip ${r.clip_index + 1} is changed in version ${version}.` : `Done: clip ${r.clip_index + 1} is changed.`),
    rewrittenLine(r),
    costLine(r),
    actions);
}

function failureMessage(r, dismissed) {
  const error = r.error || { code: "failed", message: "This did not work." };
  const details = el("details", { class: "details" },
    el("summary", {}, "Details"),
    el("dl", {},
      el("dt", {}, "Error code"), el("dd", {}, error.code),
      el("dt", {}, "Step"), el("dd", {}, STAGES[r.stage] || r.stage || "—"),
      el("dt", {}, "Attempts"), el("dd", {}, String(r.attempts)),
      el("dt", {}, "Time"), el("dd", {}, when(r.finished_at || r.created_at)),
      el("dt", {}, "Spent"), el("dd", {}, money(r.cost))));
  const children = [
    el("p", { class: "msg-title" }, "This change did not work."),
    el("p", {}, error.message),
    el("p", { class: "hint" }, "The previous video is kept."),
  ];
  if (dismissed) {
    children.push(el("p", { class: "hint" }, "You left it as it was."));
  } else if (isLatest(r)) {
    const busy = Boolean(state.job.active_regeneration_id);
    children.push(el("div", { class: "actions" },
      el("button", { type: "button", class: "small", disabled: busy,
        onclick: () => send(r.clip_index, r.instruction) }, "Try again"),
      el("button", { type: "button", class: "quiet small", onclick: () => dismissError(r.id) }, "Cancel")));
  }
  children.push(details);
  return assistant("error", ...children);
}

function cancelledMessage(r) {
  return assistant("cancelled",
    el("p", {}, "Cancelled. The video is as it was before."),
    Number(r.cost) > 0 ? el("p", { class: "cost-line" }, `Spent before cancelling: ${money(r.cost)}`) : "");
}

function noteMessage(note) {
  const children = [el("p", { class: "msg-title" }, note.title), el("p", {}, note.text)];
  const actions = el("div", { class: "actions" });
  if (note.retry) {
    actions.append(el("button", { type: "button", class: "small",
      onclick: () => { dropNote(note.id); send(note.clipIndex, note.retry); } }, "Try again"));
  }
  const running = note.conflict ? activeRegeneration() : null;
  if (running && running.clip_index !== note.clipIndex) {
    actions.append(el("button", { type: "button", class: "quiet small",
      onclick: () => selectClip(running.clip_index, false) }, `Show the change to clip ${running.clip_index + 1}`));
  }
  actions.append(el("button", { type: "button", class: "quiet small", onclick: () => dropNote(note.id) }, "Dismiss"));
  children.push(actions);
  if (note.code) {
    children.push(el("details", { class: "details" }, el("summary", {}, "Details"),
      el("dl", {}, el("dt", {}, "Error code"), el("dd", {}, note.code),
        el("dt", {}, "Time"), el("dd", {}, when(note.at)))));
  }
  return assistant("error", ...children);
}

function isLatest(r) {
  return state.regenerations.length > 0 && state.regenerations[0].id === r.id;
}

function dismissedErrors() {
  const key = `clipchat-dismissed:${state.job.id}`;
  try {
    return new Set(JSON.parse(localStorage.getItem(key) || "[]"));
  } catch {
    return new Set();
  }
}

function dismissError(id) {
  const ids = dismissedErrors();
  ids.add(id);
  localStorage.setItem(`clipchat-dismissed:${state.job.id}`, JSON.stringify([...ids].slice(-50)));
  renderThread();
  announce("Left as it was. The previous video is kept.");
  $("instruction").focus();
}

function dropNote(id) {
  state.notes = state.notes.filter((note) => note.id !== id);
  renderThread();
}

function updateProgress() {
  const progress = state.progress;
  const bar = $("run-progress");
  if (!bar || !progress) return;
  const stage = STAGES[progress.stage] || progress.stage || "Working";
  const stageNode = $("run-stage");
  if (stageNode.textContent !== stage) {
    stageNode.textContent = stage;
    $("run-status").textContent = stage;
  }
  bar.value = Math.max(0, Math.min(1, progress.fraction || 0));
  let eta = progress.eta;
  if (!eta && progress.fraction > 0.05 && progress.fraction < 1 && state.runStartedAt) {
    const elapsed = (Date.now() - state.runStartedAt) / 1000;
    eta = (elapsed / progress.fraction) * (1 - progress.fraction);
  }
  $("run-eta").textContent = formatEta(eta);
}

// --- the composer ------------------------------------------------------------------------------

function renderComposer() {
  const job = state.job;
  if (!job) return;
  renderAlso(job);
  updateEstimate();
}

// Send is off while work runs, and when the estimate of the chosen clips passes the budget left.
function renderSend() {
  const job = state.job;
  const busy = Boolean(job.active_regeneration_id) || job.status === "composing" || Boolean(state.pending);
  const send = $("send");
  send.disabled = busy || Boolean(state.overBudget);
  send.textContent = busy ? "Working…" : "Send";
  send.title = !busy && state.overBudget ? state.overBudget : "";
}

// "Apply to more clips": a box per other clip; the selected clip is always part of the change.
function renderAlso(job) {
  const box = $("also-clips");
  const chosen = new Set(alsoChosen());
  const items = job.clips.filter((clip) => clip.index !== state.selectedClip).map((clip) => ({
    key: `also-${clip.index}`, sig: `${clip.index}`,
    build: () => el("label", {},
      el("input", { type: "checkbox", value: String(clip.index), checked: chosen.has(clip.index) || null }),
      `Clip ${clip.index + 1}`),
  }));
  items.push({ key: "also-all", sig: "all", build: () => el("button", {
    type: "button", class: "quiet small", onclick: () => {
      const boxes = [...$("also-clips").querySelectorAll("input[type=checkbox]")];
      const all = boxes.every((b) => b.checked);
      for (const b of boxes) b.checked = !all;
      updateEstimate();
    },
  }, "All clips") });
  reconcile(box, items);
}

function alsoChosen() {
  return [...$("also-clips").querySelectorAll("input[type=checkbox]:checked")].map((b) => Number(b.value));
}

// The clips a change sent now would name: the selected one and those ticked under "Apply to more clips".
function chosenClips() {
  return [...new Set([state.selectedClip, ...alsoChosen()])].sort((a, b) => a - b);
}

function updateEstimate() {
  const job = state.job;
  const target = $("estimate");
  if (!job) return;
  const active = activeRegeneration();
  const changing = activeRows().map((r) => r.clip_index).sort((a, b) => a - b);
  state.overBudget = null;
  delete target.dataset.cost;
  if (active && !changing.includes(state.selectedClip)) {
    const list = changing.length ? changing : [active.clip_index];
    target.textContent = `${clipList(list)} ${list.length > 1 ? "are" : "is"} being changed; wait for it or cancel it.`;
  } else if (job.status === "composing") {
    target.textContent = "The video is still being composed.";
  } else if (!active) {
    const clips = chosenClips();
    const known = state.estimates.get(job, clips, (key, result) => {
      if (state.job && Estimates.key(state.job, chosenClips()) === key) showEstimate(result);
    });
    if (known) {
      showEstimate(known);
      return;
    }
    target.textContent = "Estimating the cost…";
  } else {
    target.textContent = "";
  }
  renderSend();
}

// "Estimated cost about $x ($y of the budget left)", or why it cannot be sent.
function showEstimate(estimate) {
  const target = $("estimate");
  state.overBudget = null;
  delete target.dataset.cost;
  if (estimate.error) {
    const left = Math.max(0, Number(state.job.budget_limit) - Number(state.job.total_cost));
    target.textContent = `The estimate could not be read; nothing is spent past the budget (${money(left)} left).`;
  } else if (!estimate.within_budget) {
    target.dataset.cost = estimate.estimated_cost;
    // Two amounts that round alike are written to the hundredth of a cent: "$0.05 and $0.05" says nothing.
    const [cost, left] = [estimate.estimated_cost, estimate.budget_left].map((value) =>
      (money(estimate.estimated_cost) === money(estimate.budget_left) ? `$${Number(value).toFixed(4)}` : money(value)));
    state.overBudget = `Over the budget: this would cost about ${cost} and the budget has ${left} left.`;
    target.textContent = `${state.overBudget} ` +
      (chosenClips().length > 1 ? "Pick fewer clips, or restore a version (free)." : "Restoring a version costs nothing.");
  } else {
    target.dataset.cost = estimate.estimated_cost;
    target.textContent = `Estimated cost about ${money(estimate.estimated_cost)} ` +
      `(${money(estimate.budget_left)} of the budget left).` +
      (estimate.budget_warning ? " This brings the video near its budget." : "");
  }
  renderSend();
}

$("also-clips").addEventListener("change", () => updateEstimate());

$("instruction").addEventListener("input", () => {
  clearTimeout(state.estimateTimer);
  state.estimateTimer = setTimeout(() => {
    $("instruction-count").textContent = `${$("instruction").value.length} / ${MAX_INSTRUCTION}`;
  }, 120);
});

// Enter sends, Shift+Enter starts a new line (as in chat apps).
$("instruction").addEventListener("keydown", (event) => {
  if (event.key === "Enter" && !event.shiftKey && !event.isComposing) {
    event.preventDefault();
    $("composer").requestSubmit();
  }
});

$("composer").addEventListener("submit", (event) => {
  event.preventDefault();
  const instruction = $("instruction").value.trim();
  if (!instruction) {
    announce("Write what should change first.");
    $("instruction").focus();
    return;
  }
  if ($("send").disabled) {
    if (state.overBudget) announce(state.overBudget);
    return;
  }
  send(state.selectedClip, instruction, alsoChosen());
});

function conversationFor(clipIndex) {
  const turns = [];
  const done = state.regenerations.filter((r) => r.clip_index === clipIndex && r.status === "completed").reverse();
  for (const r of done) {
    turns.push({ role: "user", content: r.instruction.slice(0, 4000) });
    const reply = r.change_summary || r.modified_prompt;
    if (reply) turns.push({ role: "assistant", content: reply.slice(0, 4000) });
  }
  return turns.slice(-MAX_TURNS);
}

async function send(clipIndex, instruction, also = []) {
  const job = state.job;
  if (!job || state.pending) return;
  if (clipIndex !== state.selectedClip) selectClip(clipIndex, false);
  state.pending = { clipIndex, instruction, at: new Date().toISOString(), regenerationId: null };
  renderThread();
  renderComposer();
  const clips = [...new Set([clipIndex, ...also])].sort((a, b) => a - b);
  const body = { instruction, conversation_history: conversationFor(clipIndex) };
  try {
    const accepted = clips.length > 1
      ? await state.api.post(`/jobs/${job.id}/regenerate`, { ...body, clips })
      : await state.api.post(`/jobs/${job.id}/clips/${clipIndex}/regenerate`, body);
    if (clips.length > 1) {
      for (const b of $("also-clips").querySelectorAll("input[type=checkbox]")) b.checked = false;
      $("also").open = false;
      const mine = (accepted.clips || []).find((c) => c.clip_index === clipIndex);
      if (mine) state.pending.regenerationId = mine.regeneration_id;
    }
    state.pending.regenerationId = state.pending.regenerationId || accepted.regeneration_id;
    if ($("instruction").value.trim() === instruction) {
      $("instruction").value = "";
      $("instruction-count").textContent = `0 / ${MAX_INSTRUCTION}`;
    }
    state.runStartedAt = Date.now();
    state.progress = { regenerationId: accepted.regeneration_id, stage: "queued", fraction: 0, eta: null };
    announce(`Sent${clips.length > 1 ? ` for ${clipList(clips).toLowerCase()}` : ""}. ` +
      `Estimated cost ${money(accepted.estimated_cost)}.` +
      (accepted.budget_warning ? " This brings the video near its budget." : ""));
    await refresh();
  } catch (error) {
    state.pending = null;
    refused(clipIndex, instruction, error);
    renderComposer();
    if (error.status === 409) scheduleRefresh(0);
  }
}

function refused(clipIndex, instruction, error) {
  const note = {
    id: `note-${Date.now()}`, clipIndex, at: new Date().toISOString(), code: error.code,
    title: "This was not sent.", text: error.message, retry: null, conflict: false,
  };
  if (error.status === 409) {
    note.title = "Another change is running.";
    note.text = `${error.message} Nothing was spent; send it again once that change is over.`;
    note.retry = instruction;
    note.conflict = true;
  } else if (error.status === 402) {
    const job = state.job;
    note.title = "Over the budget.";
    note.text = `${error.message} This video has used ${money(job.total_cost)} of its ` +
      `${money(job.budget_limit)} budget; nothing was spent. Restoring a version costs nothing.`;
  } else if (error.retryable || error.status === 0 || error.status === 429 || error.status >= 500) {
    note.retry = instruction;
  }
  state.notes.push(note);
  renderThread();
  announce(`${note.title} ${error.message}`);
}

async function cancelRun(regenerationId) {
  try {
    await state.api.post(`/jobs/${state.job.id}/regenerations/${regenerationId}/cancel`);
    announce("Cancelled. The video is as it was before.");
  } catch (error) {
    announce(error.message);
  }
  await refresh();
}

// --- player, compare, versions -----------------------------------------------------------------

function viewVersion(version) {
  const job = state.job;
  const row = job.versions.find((v) => v.version === version);
  if (!row) return;
  const video = $("video");
  if (version !== job.current_version) {
    state.shownVersion = version;
    video.src = row.url;
    $("now-showing").textContent = `Showing version ${version} (the current one is ${job.current_version}).`;
  }
  video.scrollIntoView({ block: "center", behavior: "smooth" });
  video.focus();
}

function previousVersion(version) {
  const older = state.job.versions.map((v) => v.version).filter((n) => n < version);
  return older.length ? Math.max(...older) : null;
}

// Where each clip sits in a version: after the clips before it, less the transitions' overlaps.
function clipWindow(clipIndex) {
  const clips = state.job.clips;
  const transitions = state.job.transitions || [];
  let start = 0;
  for (let i = 0; i < clipIndex; i += 1) {
    start += clips[i].duration - (transitions[i] ? transitions[i].duration : 0);
  }
  return { start, end: start + clips[clipIndex].duration };
}

function compareVersions(a, b, clipIndex = null) {
  const job = state.job;
  const before = job.versions.find((v) => v.version === a);
  const after = job.versions.find((v) => v.version === b);
  if (!before || !after) return;
  const whole = { start: 0, end: Math.min(before.duration, after.duration) };
  compare.open({ beforeUrl: before.url, afterUrl: after.url, beforeLabel: `Before · version ${a}`,
    afterLabel: `After · version ${b}`, ...compareWindow(a, b, clipIndex, whole) });
  markChangedClips(job.id, a, b, clipIndex, whole);
}

function compareWindow(a, b, clipIndex, whole) {
  if (clipIndex === null) return { caption: `Version ${a} and version ${b}, seeked together.`, ...whole };
  return { caption: `Clip ${clipIndex + 1}: version ${a} (before) and version ${b} (after), seeked together.`,
    ...clipWindow(clipIndex) };
}

// Which clips differ between the two versions (GET …/versions/{a}/compare/{b}): marked in the compare.
async function markChangedClips(jobId, a, b, clipIndex, whole) {
  const asked = state.compareAsked + 1;
  state.compareAsked = asked;
  let diff;
  try {
    diff = await state.api.get(`/jobs/${jobId}/versions/${a}/compare/${b}`);
  } catch (error) {
    if (asked === state.compareAsked) compare.showChanges(null, `Which clips changed could not be read: ${error.message}`);
    return;
  }
  if (asked !== state.compareAsked || !state.job || state.job.id !== jobId || $("compare").hidden) return;
  compare.showChanges({ count: state.job.clips.length, clips: diff.clips, cost: diff.cost, selected: clipIndex,
    onPick: (index) => compare.setWindow(compareWindow(a, b, index, whole)) });
}

function renderBudget(job) {
  $("cost").textContent = money(job.total_cost);
  $("budget").textContent = money(job.budget_limit);
  $("budget-meter").value = Math.min(1, job.budget_used_fraction);
  $("budget-warning").hidden = !job.budget_warning;
  state.usage.update(job, state.regenerations);
}

function renderVersions(job) {
  const running = Boolean(job.active_regeneration_id);
  const byId = new Map(state.regenerations.map((r) => [r.id, r]));
  $("versions").replaceChildren(...job.versions.slice().reverse().map((version) => {
    const current = version.version === job.current_version;
    const made = version.created_by_regeneration_id ? byId.get(version.created_by_regeneration_id) : null;
    const what = made ? `${clipList(clipsOfChange(made))}: “${made.instruction}”`
      : version.created_by_regeneration_id ? "A change" : "The first composition";
    return el("li", {},
      el("span", { class: "version-text" },
        el("strong", {}, `Version ${version.version}`), ` · ${what}`,
        el("span", { class: "hint" }, `${version.duration.toFixed(1)} s · ${when(version.created_at)}`)),
      current
        ? el("span", { class: "badge completed" }, "current")
        : el("button", {
          type: "button", class: "quiet small", disabled: running,
          "aria-label": `Restore version ${version.version}`, onclick: () => confirmRestore(version.version),
        }, "Restore"));
  }));
  const form = $("versions-compare");
  form.hidden = job.versions.length < 2;
  const options = () => job.versions.map((v) => el("option", { value: String(v.version) }, `version ${v.version}`));
  const a = $("compare-a");
  const b = $("compare-b");
  const sameList = a.options.length === job.versions.length;
  const keepA = sameList ? a.value : "";
  const keepB = sameList ? b.value : "";
  a.replaceChildren(...options());
  b.replaceChildren(...options());
  const numbers = job.versions.map((v) => String(v.version));
  a.value = numbers.includes(keepA) ? keepA : numbers[Math.max(0, numbers.length - 2)];
  b.value = numbers.includes(keepB) ? keepB : numbers[numbers.length - 1];
}

$("versions-compare").addEventListener("submit", (event) => {
  event.preventDefault();
  const a = Number($("compare-a").value);
  const b = Number($("compare-b").value);
  if (a === b) {
    announce("Pick two different versions to compare.");
    return;
  }
  compareVersions(Math.min(a, b), Math.max(a, b));
});

function confirmRestore(version) {
  const dialog = $("confirm");
  $("confirm-title").textContent = `Restore version ${version}?`;
  $("confirm-text").textContent = `Version ${version} becomes the current video. Nothing is deleted: ` +
    `version ${state.job.current_version} stays in the list and can be restored again.`;
  $("confirm-ok").textContent = `Restore version ${version}`;
  dialog.returnValue = "";
  dialog.onclose = () => {
    if (dialog.returnValue === "ok") restore(version);
  };
  dialog.showModal();
}

async function restore(version) {
  try {
    state.job = await state.api.post(`/jobs/${state.job.id}/versions/${version}/restore`);
    render();
    announce(`Version ${version} is the current video again.`);
  } catch (error) {
    notice(error.message);
  }
}

function announce(message) {
  $("run-status").textContent = message;
}

// --- start -------------------------------------------------------------------------------------

const token = pageToken() || localStorage.getItem(TOKEN_KEY);
if (token) start(token);
else signOut();
