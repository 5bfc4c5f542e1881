// Small DOM and formatting helpers shared by the page's modules.

export const $ = (id) => document.getElementById(id);

export function el(tag, attrs = {}, ...children) {
  const node = document.createElement(tag);
  for (const [key, value] of Object.entries(attrs)) {
    if (key === "class") node.className = value;
    else if (key.startsWith("on")) node.addEventListener(key.slice(2), value);
    else if (value !== null && value !== undefined && value !== false) node.setAttribute(key, value === true ? "" : value);
  }
  for (const child of children) {
    if (child !== null && child !== undefined && child !== "") node.append(child);
  }
  return node;
}

// Update ``parent``'s children to ``items`` ({key, sig, build}) in order, keeping every node whose
// key and signature are unchanged (no flicker, no lost focus, thumbnails not fetched again).
export function reconcile(parent, items) {
  const existing = new Map();
  for (const node of parent.children) if (node.dataset.key) existing.set(node.dataset.key, node);
  let cursor = parent.firstElementChild;
  for (const item of items) {
    let node = existing.get(item.key);
    if (node && node.dataset.sig !== item.sig) {
      const fresh = make(item);
      if (node === cursor) cursor = fresh;
      node.replaceWith(fresh);
      node = fresh;
    }
    if (!node) node = make(item);
    existing.set(item.key, node);
    if (node === cursor) cursor = cursor.nextElementSibling;
    else parent.insertBefore(node, cursor);
  }
  while (cursor) {
    const next = cursor.nextElementSibling;
    cursor.remove();
    cursor = next;
  }
}

function make(item) {
  const node = item.build();
  node.dataset.key = item.key;
  node.dataset.sig = item.sig;
  return node;
}

export function money(value) {
  const amount = Number(value || 0);
  if (amount > 0 && amount < 0.01) return `$${amount.toFixed(4)}`;
  return `$${amount.toFixed(2)}`;
}

export const when = (iso) => (iso ? new Date(iso).toLocaleString() : "");
export const clock = (iso) => (iso ? new Date(iso).toLocaleTimeString([], { hour: "2-digit", minute: "2-digit" }) : "");

export function formatEta(seconds) {
  if (!Number.isFinite(seconds) || seconds <= 0) return "";
  if (seconds < 60) return `about ${Math.ceil(seconds)} s left`;
  return `about ${Math.ceil(seconds / 60)} min left`;
}
