// Two videos side by side, seeked and played together over one window of time (a clip's place).
import { $ } from "/static/dom.js";

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
    this.pause();
    this.start = start;
    this.end = Math.max(start + 0.1, end);
    $("compare-before-label").textContent = beforeLabel;
    $("compare-after-label").textContent = afterLabel;
    $("compare-caption").textContent = caption;
    this.seek.min = String(this.start);
    this.seek.max = String(this.end);
    this.seek.value = String(this.middle());
    this.before.src = beforeUrl;
    this.after.src = afterUrl;
    const section = $("compare");
    section.hidden = false;
    this.seekTo(this.middle());
    section.scrollIntoView({ block: "nearest", behavior: "smooth" });
    section.focus({ preventScroll: true });
  }

  close() {
    this.pause();
    $("compare").hidden = true;
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
