// A job's usage beside its budget: spend by step, changes by outcome and median time per stage,
// from GET /jobs/{id}/usage. Each is a table (what a screen reader reads) whose cells carry a bar
// (decoration only), so the chart and its text alternative are one thing.
import { $, el, money } from "/static/dom.js";

const STEPS = [["rewrite", "Prompt rewrites"], ["generate", "Generation"], ["compose", "Composition"]];
const OUTCOMES = [["completed", "Completed"], ["failed", "Failed"], ["cancelled", "Cancelled"], ["running", "Running"]];

export class UsageChart {
  constructor(api, stageNames) {
    this.api = api;
    this.stageNames = stageNames;
    this.key = null;
    this.jobId = null;
  }

  // Read the usage again when what it counts has changed: a change started or finished, or the
  // job's total moved (a progress event changes none of these, so it never asks).
  update(job, regenerations) {
    const finished = regenerations.filter((r) => !["queued", "running"].includes(r.status)).length;
    const running = job.active_regeneration_id || "";
    const key = `${job.id}|${finished}|${running}|${job.total_cost}`;
    if (key === this.key) return;
    this.key = key;
    this.jobId = job.id;
    this.load(job.id, key);
  }

  async load(jobId, key) {
    let usage;
    try {
      usage = await this.api.get(`/jobs/${jobId}/usage`);
    } catch {
      if (this.key === key) this.key = null; // asked again at the next refresh
      return;
    }
    if (this.key !== key) return; // a newer read is on its way
    render(usage, this.stageNames);
  }
}

function render(usage, stageNames) {
  const box = $("usage");
  const wasOpen = Boolean(box.querySelector(".usage-more[open]"));
  const steps = STEPS.map(([field, label]) => [label, Number(usage.spend_by_step[field] || 0), field]);
  const outcomes = OUTCOMES.map(([field, label]) => [label, usage.changes[field] || 0, field]);
  const stages = usage.median_seconds_by_stage.map((s) => [stageNames[s.stage] || s.stage,
    s.median_seconds, s.stage, s.samples]);
  box.replaceChildren(
    table("Spend by step", "usage-spend", steps, money, Number(usage.total_cost) > 0
      ? `Total ${money(usage.total_cost)}` + (Number(usage.running_cost) > 0
        ? `, and ${money(usage.running_cost)} by the change running now.` : ".") : "Nothing spent yet."),
    table("Clip changes", "usage-changes", outcomes, (n) => String(n),
      usage.median_change_seconds ? `A completed clip change took ${seconds(usage.median_change_seconds)} (median).` : ""),
    // The stages are many: folded away, opened on demand (kept open across reads).
    stages.length ? el("details", { class: "usage-more", open: wasOpen || null },
      el("summary", {}, "Time per stage"),
      table("Median time per stage", "usage-stages", stages, seconds, "")) : "",
  );
  box.hidden = false;
}

// One table: a row per item, its bar as wide as its share of the largest value.
function table(title, id, rows, format, note) {
  const top = Math.max(0, ...rows.map((row) => row[1]));
  return el("table", { class: "usage-table", id },
    el("caption", {}, title),
    el("tbody", {}, ...rows.map(([label, value, key, samples]) => el("tr", { "data-item": key, "data-value": String(value) },
      el("th", { scope: "row" }, label),
      el("td", { class: "usage-bar-cell" },
        el("span", { class: `usage-bar ${id}-${key}`, "aria-hidden": "true",
          style: `--share: ${top > 0 ? (value / top).toFixed(4) : 0}` })),
      el("td", { class: "usage-value", title: samples ? `${samples} measured` : null }, format(value))))),
    note ? el("tfoot", {}, el("tr", {}, el("td", { colspan: "3", class: "hint" }, note))) : "");
}

function seconds(value) {
  if (value < 0.05) return "<0.1 s";
  if (value >= 60) return `${(value / 60).toFixed(1)} min`;
  return `${value < 10 ? value.toFixed(1) : Math.round(value)} s`;
}
