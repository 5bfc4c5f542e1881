// Two videos side by side, seeked and played together over one window of time (a clip's place),
// with the clips of the two versions listed and the ones that differ marked.
import { $, el, money } from "/static/dom.js";

export class Compare {
  constructor() {
    this.before = $("compare-before");
    this.after = $("compare-after");
    this.seek = $("compare-seek");
    this.start = 0;
    this.end = 0;
    this.playing = false;
    this.seek.addEventListener("input", () => this.seekTo(Number(this.seek.value)));
    $("compare-play").addEventListener("click", () => (this.playing ? this.pause() : this.play()));
    $("compare-close").addEventListener("click", () => this.close());
    // The "after" video leads; the "before" one follows it, and both loop over the window.
    this.after.addEventListener("timeupdate", () => this.follow());
    for (const video of [this.before, this.after]) {
      video.addEventListener("error", () => { $("compare-caption").textContent = "This version could not be loaded."; });
    }
  }

  open({ beforeUrl, afterUrl, beforeLabel, afterLabel, caption, start, end }) {
    $("compare-before-label").textContent = beforeLabel;
    $("compare-after-label").textContent = afterLabel;
    this.showChanges(null);
    this.before.src = beforeUrl;
    this.after.src = afterUrl;
    this.setWindow({ caption, start, end });
    const section = $("compare");
    section.hidden = false;
    section.scrollIntoView({ block: "nearest", behavior: "smooth" });
    section.focus({ preventScroll: true });
  }

  // Seek both videos to another window of time (another clip's place).
  setWindow({ caption, start, end }) {
    this.pause();
    this.start = start;
    this.end = Math.max(start + 0.1, end);
    $("compare-caption").textContent = caption;
    this.seek.min = String(this.start);
    this.seek.max = String(this.end);
    this.seek.value = String(this.middle());
    this.seekTo(this.middle());
  }

  // The clips of the two versions, a button each (to look at that clip), the ones that differ marked
  // "changed". ``changes`` is null while they are being read; ``error`` says they could not be.
  showChanges(changes, error = "") {
    const list = $("compare-clips");
    const summary = $("compare-changes");
    if (!changes) {
      list.replaceChildren();
      summary.textContent = error;
      return;
    }
    const { count, clips, cost, selected, onPick } = changes;
    const changed = new Map(clips.map((diff) => [diff.index, diff]));
    const numbers = clips.map((diff) => diff.index + 1);
    summary.textContent = !numbers.length ? "No clip differs between these two versions."
      : `Changed: ${numbers.length > 1 ? `clips ${numbers.slice(0, -1).join(", ")} and ${numbers.at(-1)}`
        : `clip ${numbers[0]}`} (${money(cost)} spent in between).`;
    const pick = (index) => {
      for (const button of list.querySelectorAll("button")) {
        button.setAttribute("aria-pressed", String(Number(button.dataset.index) === index));
      }
      onPick(index);
    };
    list.replaceChildren(...Array.from({ length: count }, (_, index) => clipButton(index, changed.get(index),
      index === selected, pick)));
  }

  close() {
    this.pause();
    $("compare").hidden = true;
    this.showChanges(null);
    for (const video of [this.before, this.after]) {
      video.removeAttribute("src");
      video.load();
    }
  }

  middle() {
    return (this.start + this.end) / 2;
  }

  seekTo(time) {
    const t = Math.min(this.end, Math.max(this.start, time));
    for (const video of [this.before, this.after]) video.currentTime = t;
    this.show(t);
  }

  show(t) {
    this.seek.value = String(t);
    $("compare-time").textContent = `${t.toFixed(1)} s`;
  }

  async play() {
    this.playing = true;
    $("compare-play").textContent = "Pause";
    if (this.after.currentTime >= this.end - 0.05) this.seekTo(this.start);
    try {
      await Promise.all([this.before.play(), this.after.play()]);
    } catch {
      this.pause();
    }
  }

  pause() {
    this.playing = false;
    $("compare-play").textContent = "Play both";
    this.before.pause();
    this.after.pause();
  }

  follow() {
    if (!this.playing) return;
    const t = this.after.currentTime;
    if (t >= this.end) {
      this.seekTo(this.start);
      return;
    }
    if (Math.abs(this.before.currentTime - t) > 0.15) this.before.currentTime = t;
    this.show(t);
  }
}

function clipButton(index, diff, pressed, pick) {
  const label = diff
    ? `Clip ${index + 1}, changed: from “${diff.prompt_before}” to “${diff.prompt_after}”`
    : `Clip ${index + 1}, unchanged`;
  return el("li", {}, el("button", {
    type: "button", class: `compare-clip small${diff ? " changed" : ""}`, "data-index": String(index),
    "aria-pressed": String(pressed), "aria-label": label, title: label, onclick: () => pick(index),
  }, `Clip ${index + 1}`, diff ? el("span", { class: "compare-mark" }, "changed") : ""));
}
