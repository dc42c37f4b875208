// The Smalti audit UI: plain JavaScript, no library, nothing fetched from anywhere but this service.
//
// The service that serves this page is the party under audit's, so the page trusts it for nothing it shows as
// verified. No private key ever enters it: signing in takes a one-time code signed outside the browser
// (smalti auditor sign-in). "Verified in your browser" is shown only when this code computed it, with the
// browser's own WebCrypto, against the trainer key the auditor typed in: the checkpoint's note signature, the
// entry's inclusion proof, that the entry is the one asked for (index and step), and, from the second visit
// on, a consistency proof from the last tree this browser verified for the same log (kept in localStorage),
// so a service that shows a different history later is caught as a witness would catch it.
"use strict";

const $ = (id) => document.getElementById(id);
const enc = new TextEncoder();
const dec = new TextDecoder("utf-8", { fatal: true });
const SVG = "http://www.w3.org/2000/svg";
let current = null; // {run, info, summary, opened}: what the page shows now
let opening = 0; // counts run openings: a late answer for an earlier one is dropped, never shown under this one
const stillOpen = (run, opened) => current !== null && current.run === run && current.opened === opened;

// ---------------------------------------------------------------------------------------------- bytes

function b64decode(text) { return Uint8Array.from(atob(text), (c) => c.charCodeAt(0)); }
function hex(bytes) { return Array.from(bytes, (b) => b.toString(16).padStart(2, "0")).join(""); }
function unhex(text) {
  if (typeof text !== "string" || !/^([0-9a-f]{2})*$/.test(text)) throw new Error("a proof hash is not hex");
  return Uint8Array.from(text.match(/../g) || [], (h) => parseInt(h, 16));
}
function concat(...parts) {
  const out = new Uint8Array(parts.reduce((n, p) => n + p.length, 0));
  let at = 0; for (const p of parts) { out.set(p, at); at += p.length; }
  return out;
}
async function sha256(bytes) { return new Uint8Array(await crypto.subtle.digest("SHA-256", bytes)); }
function equal(a, b) { return a.length === b.length && a.every((x, i) => x === b[i]); }
const half = (n) => Math.floor(n / 2); // sizes may pass 2**31: no 32-bit bit operators on them
const odd = (n) => n % 2 === 1;
function svgEl(tag, attrs = {}, text) {
  const node = document.createElementNS(SVG, tag);
  for (const [k, v] of Object.entries(attrs)) node.setAttribute(k, v);
  if (text !== undefined) node.textContent = text;
  return node;
}
function cell(row, text, className) {
  const td = document.createElement("td");
  td.textContent = text;
  if (className) td.className = className;
  row.appendChild(td);
  return td;
}
function facts(table, pairs) {
  table.replaceChildren();
  for (const [k, v] of pairs) {
    const row = document.createElement("tr");
    const th = document.createElement("th"); th.textContent = k; row.appendChild(th);
    cell(row, typeof v === "string" ? v : JSON.stringify(v));
    table.appendChild(row);
  }
}

// ---------------------------------------------------------------------------------------------- the API

class SignedOut extends Error {}

// A session is two halves: an HttpOnly cookie the browser sends, and this token, kept per origin in
// sessionStorage and sent as a header. A page of another service on the same host gets the cookie (cookies
// ignore ports) but never this half.
const SESSION = "smalti-session";

async function api(path, options = {}) {
  const headers = { ...(options.headers || {}) };
  const token = sessionStorage.getItem(SESSION);
  if (token) headers["X-Smalti-Session"] = token;
  const response = await fetch(path, { credentials: "same-origin", ...options, headers });
  if (!response.ok) {
    let message = response.statusText;
    try { message = (await response.json()).error; } catch (e) { /* not JSON */ }
    if (response.status === 401) throw new SignedOut(message);
    throw new Error(`${response.status}: ${message}`);
  }
  const type = response.headers.get("content-type") || "";
  return type.startsWith("application/json") ? response.json() : response.text();
}

// Every action goes through here: an expired session brings the sign-in form back, with the reason.
function guarded(action) {
  return async (...args) => {
    try { return await action(...args); } catch (error) {
      if (error instanceof SignedOut) { showSignIn(`Your session ended (${error.message}). Sign in again.`); return; }
      throw error;
    }
  };
}

// ---------------------------------------------------------------------------------------------- signing in

function showSignIn(message) {
  sessionStorage.removeItem(SESSION);
  $("app").hidden = true;
  $("sign-in").hidden = false;
  $("sign-out").hidden = true;
  $("who").textContent = "";
  $("sign-in-status").textContent = message || "";
}

async function signIn(code) {
  const status = $("sign-in-status");
  status.textContent = "signing in...";
  try {
    const session = await api("/api/login", { method: "POST", headers: { "Content-Type": "application/json" },
                                              body: JSON.stringify({ code: code.trim() }) });
    sessionStorage.setItem(SESSION, session.session);
    $("code").value = "";
    status.textContent = "";
    await start();
  } catch (error) {
    status.textContent = `sign-in failed: ${error.message}`;
  }
}

async function start() {
  const me = await api("/api/whoami");
  $("who").textContent = `signed in as ${me.reader} (key ${me.key_id})`;
  $("sign-out").hidden = false;
  $("sign-in").hidden = true;
  $("app").hidden = false;
  $("trainer-key").value = localStorage.getItem("smalti-trainer-key") || "";
  await loadRuns();
}

async function signOut() {
  try { await api("/api/logout", { method: "POST", headers: { "Content-Type": "application/json" }, body: "{}" }); }
  catch (error) { /* already ended */ }
  current = null;
  showSignIn("Signed out.");
}

// ---------------------------------------------------------------------------------------------- runs

async function loadRuns() {
  const runs = await api("/api/runs");
  const body = $("runs").querySelector("tbody");
  body.replaceChildren();
  for (const run of runs) {
    const row = document.createElement("tr");
    row.className = "run-row";
    row.dataset.run = run.run;
    const first = document.createElement("td");
    const link = document.createElement("button");
    link.type = "button"; link.className = "run-link"; link.textContent = run.run;
    link.addEventListener("click", guarded(() => openRun(run.run)));
    first.appendChild(link); row.appendChild(first);
    cell(row, String(run.entries));
    cell(row, run.final ? "final" : "in progress");
    cell(row, run.signed || "-");
    const trust = run.trust || {};
    cell(row, trust.trusted ? `signed by ${trust.trainer}` : `NOT TRUSTED: ${trust.reason}`,
         trust.trusted ? "trusted" : "untrusted");
    body.appendChild(row);
  }
  drawLineage(runs);
}

// Parents left of children, one column per generation; arrows carry the link's kind.
function drawLineage(runs) {
  const svg = $("lineage");
  svg.replaceChildren();
  const defs = svgEl("defs");
  const marker = svgEl("marker", { id: "arrow", viewBox: "0 0 10 10", refX: 10, refY: 5, markerWidth: 8,
                                   markerHeight: 8, orient: "auto-start-reverse" });
  marker.appendChild(svgEl("path", { d: "M 0 0 L 10 5 L 0 10 z", fill: "#666" }));
  defs.appendChild(marker);
  svg.appendChild(defs);
  const byName = new Map(runs.map((r) => [r.run, r]));
  const depth = new Map();
  const depthOf = (name, seen = new Set()) => {
    if (depth.has(name)) return depth.get(name);
    const run = byName.get(name);
    const parent = run && run.parent && byName.has(run.parent) && !seen.has(run.parent) ? run.parent : null;
    seen.add(name);
    const d = parent ? depthOf(parent, seen) + 1 : 0;
    depth.set(name, d);
    return d;
  };
  runs.forEach((r) => depthOf(r.run));
  const columns = [];
  for (const r of runs) (columns[depth.get(r.run)] = columns[depth.get(r.run)] || []).push(r);
  const width = 190, gap = 110, height = 30, vgap = 22;
  const place = new Map();
  // Each generation in its parents' order, each run level with its parent where that row is free, so that
  // edges run straight and never through another run.
  const rowOf = new Map();
  let rows = 0;
  columns.forEach((column, c) => {
    if (c > 0) column.sort((a, b) => rowOf.get(a.parent) - rowOf.get(b.parent));
    let next = 0;
    for (const r of column) {
      const row = Math.max(next, c > 0 ? rowOf.get(r.parent) : next);
      rowOf.set(r.run, row);
      next = row + 1;
      rows = Math.max(rows, next);
      place.set(r.run, { x: 10 + c * (width + gap), y: 10 + row * (height + vgap) });
    }
  });
  for (const r of runs) {
    if (!r.parent || !place.has(r.parent)) continue;
    const from = place.get(r.parent), to = place.get(r.run);
    const x1 = from.x + width, y1 = from.y + height / 2, x2 = to.x, y2 = to.y + height / 2;
    svg.appendChild(svgEl("path", { d: `M ${x1} ${y1} C ${x1 + gap / 2} ${y1}, ${x2 - gap / 2} ${y2}, ${x2} ${y2}`,
                                    class: "edge", "marker-end": "url(#arrow)", "data-from": r.parent, "data-to": r.run }));
    const label = r.link === "replay" && r.forgotten ? `replay: forgot ${r.forgotten.split("/").pop()}` : (r.link || "");
    svg.appendChild(svgEl("text", { x: (x1 + x2) / 2, y: (y1 + y2) / 2 - 6, "text-anchor": "middle", class: "edge-label" }, label));
  }
  for (const r of runs) {
    const p = place.get(r.run);
    const group = svgEl("g", { class: `node${r.trust && r.trust.trusted ? "" : " untrusted"}`, "data-run": r.run });
    group.appendChild(svgEl("rect", { x: p.x, y: p.y, width, height, rx: 4 }));
    const shown = r.run.length > 26 ? `${r.run.slice(0, 25)}…` : r.run;
    group.appendChild(svgEl("text", { x: p.x + 8, y: p.y + 19 }, shown));
    group.appendChild(svgEl("title", {}, `${r.run}${r.parent ? ` (from ${r.parent})` : ""}`));
    svg.appendChild(group);
  }
  svg.setAttribute("width", 20 + columns.length * (width + gap) - gap);
  svg.setAttribute("height", 20 + Math.max(1, rows) * (height + vgap));
}

async function openRun(name) {
  const path = `/api/runs/${encodeURIComponent(name)}`;
  for (const id of ["verdict", "certificate-verdict", "proof-details"]) { $(id).textContent = ""; $(id).className = id === "proof-details" ? "" : "verdict"; }
  $("entry").replaceChildren();
  $("certificate").replaceChildren();
  const opened = ++opening;
  const [info, summary, entropy] = await Promise.all([api(path), api(`${path}/contributions/summary`),
                                                      api(`${path}/entropy`)]);
  if (opened !== opening) return; // another run was opened meanwhile
  current = { run: name, info, summary, opened };
  document.querySelectorAll("tr.run-row").forEach((row) => row.classList.toggle("open", row.dataset.run === name));
  $("run").hidden = false;
  $("run-title").textContent = name;
  const trust = info.trust || {};
  $("run-trust").className = `verdict ${trust.trusted ? "ok" : "bad"}`;
  $("run-trust").textContent = trust.trusted ? `Signed by ${trust.trainer}, a trainer the taxonomy names (the service says so; verify below)`
    : `NOT TRUSTED: ${trust.reason}`;
  $("run-summary").textContent = `${info.steps} steps, ${info.head.size} entries, ${info.head.final ? "final" : "still training"}; ` +
    `classes ${info.classes.length}, layers ${info.layers.length}` +
    (info.lineage.length ? `; from ${info.lineage.map((l) => `${l.run} (${l.kind})`).join(" <- ")}` : "");
  const slider = $("step");
  slider.min = summary.first_step; slider.max = summary.last_step; slider.value = summary.last_step;
  $("inspect-step").value = summary.first_step;
  drawHeatmap(summary);
  drawEntropy(entropy);
  if (info.deletion_certificate) await showCertificate(name, opened);
}

// ---------------------------------------------------------------------------------------------- heatmap

let pendingStep = null;
async function slide() {
  const step = Number($("step").value);
  $("step-label").textContent = `${step} (loading)`;
  pendingStep = step;
  const { run, opened } = current;
  const summary = await api(`/api/runs/${encodeURIComponent(run)}/contributions/summary?upto_step=${step}`);
  if (pendingStep === step && stillOpen(run, opened)) drawHeatmap(summary);
}

function colour(value) { // 0..1 -> light to dark blue
  const t = Math.max(0, Math.min(1, value));
  return `rgb(${Math.round(240 - 220 * t)}, ${Math.round(244 - 184 * t)}, ${Math.round(255 - 95 * t)})`;
}

// Labels are measured before the cells are placed, so nothing is hidden under cells or cut at the edges.
function drawHeatmap(summary) {
  $("step-label").textContent = `${summary.upto_step} (${summary.entries} entries)`;
  const { layers, classes, matrix } = summary;
  const svg = $("heatmap");
  svg.replaceChildren();
  const measure = (texts, angle) => {
    const probe = svgEl("g");
    svg.appendChild(probe);
    const nodes = texts.map((t) => probe.appendChild(svgEl("text", angle ? { transform: `rotate(${angle})` } : {}, t)));
    const size = nodes.reduce((m, n) => Math.max(m, n.getBBox().width), 0);
    probe.remove();
    return size;
  };
  const size = 16, left = Math.ceil(measure(layers)) + 12, top = Math.ceil(measure(classes)) + 12, scale = 40;
  const largest = matrix.reduce((m, row) => row.reduce((n, v) => (Number.isFinite(v) ? Math.max(n, v) : n), m), 1e-12);
  const width = left + classes.length * size + 20 + scale + 60, height = top + layers.length * size + 10;
  svg.setAttribute("width", width);
  svg.setAttribute("height", Math.max(height, top + 130));
  classes.forEach((name, j) => {
    const x = left + j * size + size / 2 + 4;
    const label = svgEl("text", { x, y: top - 6, transform: `rotate(-90 ${x} ${top - 6})`, class: "class-label" }, name);
    svg.appendChild(label);
  });
  layers.forEach((layer, i) => {
    svg.appendChild(svgEl("text", { x: left - 8, y: top + i * size + 12, "text-anchor": "end", class: "layer-label" }, layer));
    classes.forEach((name, j) => {
      const value = typeof matrix[i][j] === "number" && Number.isFinite(matrix[i][j]) ? matrix[i][j] : 0;
      const rect = svgEl("rect", { x: left + j * size, y: top + i * size, width: size - 1, height: size - 1,
                                   fill: value > 0 ? colour(0.08 + 0.92 * value / largest) : "#f4f4f4",
                                   class: "cell", "data-layer": layer, "data-class": name });
      rect.appendChild(svgEl("title", {}, `${layer} / ${name}: ${Number(value).toFixed(4)}`));
      svg.appendChild(rect);
    });
  });
  // The colour scale: what a cell's shade means, from none to the largest sum shown.
  const sx = left + classes.length * size + 20, steps = 20, barHeight = 100;
  for (let k = 0; k < steps; k += 1) {
    svg.appendChild(svgEl("rect", { x: sx, y: top + barHeight - (k + 1) * barHeight / steps, width: 14,
                                    height: barHeight / steps + 0.5, fill: colour(0.08 + 0.92 * (k + 1) / steps),
                                    class: "scale" }));
  }
  svg.appendChild(svgEl("text", { x: sx + 18, y: top + 10, class: "scale-label" }, largest.toPrecision(3)));
  svg.appendChild(svgEl("text", { x: sx + 18, y: top + barHeight, class: "scale-label" }, "0"));
  svg.appendChild(svgEl("text", { x: sx, y: top + barHeight + 16, class: "scale-label" }, "summed share"));
}

// ---------------------------------------------------------------------------------------------- entropy

function ticks(low, high, count) {
  const span = high - low || 1;
  return Array.from({ length: count + 1 }, (_, i) => low + (span * i) / count);
}

function drawEntropy(entropy) {
  const svg = $("entropy");
  const legend = $("entropy-legend");
  svg.replaceChildren();
  legend.replaceChildren();
  if (!entropy.profiles.length) {
    svg.setAttribute("width", 400); svg.setAttribute("height", 30);
    svg.appendChild(svgEl("text", { x: 4, y: 20 }, "no entropy profiles recorded"));
    return;
  }
  const steps = entropy.profiles.map((p) => p.step);
  const series = entropy.layers.map((_, l) => entropy.profiles.map((p) => {
    const values = p.entropy.map((row) => row[l]).filter((v) => typeof v === "number" && Number.isFinite(v));
    return values.length ? values.reduce((a, b) => a + b, 0) / values.length : null;
  }));
  const all = series.flat().filter((v) => v !== null);
  const low = all.reduce((m, v) => Math.min(m, v), Infinity);
  const high = Math.max(all.reduce((m, v) => Math.max(m, v), -Infinity), low + 1e-9);
  const W = 760, H = 260, L = 60, R = 20, T = 10, B = 40;
  svg.setAttribute("width", W); svg.setAttribute("height", H);
  const first = steps[0], last = steps[steps.length - 1];
  const x = (s) => L + (last > first ? (s - first) / (last - first) : 0.5) * (W - L - R);
  const y = (v) => T + (1 - (v - low) / (high - low)) * (H - T - B);
  const axes = svgEl("g", { class: "axis" });
  axes.appendChild(svgEl("line", { x1: L, y1: H - B, x2: W - R, y2: H - B }));
  axes.appendChild(svgEl("line", { x1: L, y1: T, x2: L, y2: H - B }));
  for (const v of ticks(low, high, 4)) {
    axes.appendChild(svgEl("line", { x1: L - 4, y1: y(v), x2: L, y2: y(v) }));
    axes.appendChild(svgEl("text", { x: L - 6, y: y(v) + 4, "text-anchor": "end" }, v.toFixed(2)));
  }
  for (const s of ticks(first, last, Math.min(5, Math.max(1, last - first)))) {
    const step = Math.round(s);
    axes.appendChild(svgEl("line", { x1: x(step), y1: H - B, x2: x(step), y2: H - B + 4 }));
    axes.appendChild(svgEl("text", { x: x(step), y: H - B + 16, "text-anchor": "middle" }, String(step)));
  }
  axes.appendChild(svgEl("text", { x: (L + W - R) / 2, y: H - 6, "text-anchor": "middle" }, "step"));
  axes.appendChild(svgEl("text", { x: 12, y: (T + H - B) / 2, transform: `rotate(-90 12 ${(T + H - B) / 2})`,
                                   "text-anchor": "middle" }, "spectral entropy"));
  svg.appendChild(axes);
  series.forEach((values, l) => {
    const color = `hsl(${(l * 47) % 360}, 60%, 40%)`;
    const points = values.map((v, i) => (v === null ? null : [x(steps[i]), y(v)])).filter(Boolean);
    svg.appendChild(svgEl("polyline", { points: points.map((p) => p.join(",")).join(" "), fill: "none", stroke: color,
                                        class: "entropy-line" }));
    for (const [px, py] of points) svg.appendChild(svgEl("circle", { cx: px, cy: py, r: 3, fill: color }));
    const item = document.createElement("li");
    const swatch = document.createElement("span");
    swatch.className = "swatch"; swatch.style.background = color;
    item.appendChild(swatch);
    item.appendChild(document.createTextNode(entropy.layers[l]));
    legend.appendChild(item);
  });
}

// ---------------------------------------------------------------------------------------------- keys and notes

// The trainer key as the auditor pasted it: "ed25519:BASE64" (trainer.pub), or a note verifier key
// "name+hex+BASE64(0x01||key)", which also names the one log it may verify. Returns {raw, log}.
function trainerKey() {
  const text = $("trainer-key").value.trim();
  if (text.startsWith("ed25519:")) {
    const raw = b64decode(text.slice(8));
    if (raw.length !== 32) throw new Error("the trainer key is not a 32-byte Ed25519 key");
    return { raw, log: null };
  }
  const parts = text.match(/^([^+\s]+)\+([0-9a-f]{8})\+([A-Za-z0-9+/]+=*)$/); // base64 may hold "+" itself
  if (parts) {
    const raw = b64decode(parts[3]);
    if (raw.length !== 33 || raw[0] !== 1) throw new Error("the verifier key is not an Ed25519 note key");
    return { raw: raw.slice(1), log: parts[1] };
  }
  throw new Error("give the trainer's public key (ed25519:... from trainer.pub, or a note verifier key)");
}

async function noteKeyId(name, raw) {
  return (await sha256(concat(enc.encode(`${name}\n`), new Uint8Array([1]), raw))).slice(0, 4);
}

function parseNote(note) {
  const cut = note.lastIndexOf("\n\n");
  if (cut < 0) throw new Error("the checkpoint is not a signed note");
  const text = note.slice(0, cut + 1);
  const signatures = note.slice(cut + 2).split("\n").filter(Boolean).map((line) => {
    const [dash, name, sig] = line.split(" ");
    if (dash !== "\u2014" || !name || !sig) throw new Error("malformed signature line");
    return { name, bytes: b64decode(sig) };
  });
  const lines = text.split("\n");
  const size = Number(lines[1]);
  if (!/^[0-9]+$/.test(lines[1]) || !Number.isSafeInteger(size)) throw new Error("the checkpoint's size is not a number");
  return { text, signatures, origin: lines[0], size, root: b64decode(lines[2]) };
}

async function verifiedCheckpoint(note, { raw, log }) {
  const checkpoint = parseNote(note);
  if (log !== null && checkpoint.origin !== log) {
    throw new Error(`the service shows the log ${checkpoint.origin}; the verifier key you gave is for ${log}`);
  }
  const keyId = await noteKeyId(checkpoint.origin, raw);
  const line = checkpoint.signatures.find((s) => s.name === checkpoint.origin && equal(s.bytes.slice(0, 4), keyId));
  if (!line) throw new Error(`the checkpoint carries no signature by the trainer key for ${checkpoint.origin}`);
  const publicKey = await crypto.subtle.importKey("raw", raw, { name: "Ed25519" }, false, ["verify"]);
  if (!await crypto.subtle.verify("Ed25519", publicKey, line.bytes.slice(4), enc.encode(checkpoint.text))) {
    throw new Error("the checkpoint's signature does not verify under the trainer key");
  }
  return checkpoint;
}

// ---------------------------------------------------------------------------------------------- proofs (RFC 9162)

async function node(left, right) { return sha256(concat(new Uint8Array([1]), left, right)); }

async function foldInclusion(index, size, leaf, path) {
  if (!(index >= 0 && index < size)) return null;
  let fn = index, sn = size - 1, r = leaf;
  for (const p of path) {
    if (sn === 0) return null;
    if (odd(fn) || fn === sn) {
      r = await node(p, r);
      if (!odd(fn)) { while (!odd(fn) && fn !== 0) { fn = half(fn); sn = half(sn); } }
    } else {
      r = await node(r, p);
    }
    fn = half(fn); sn = half(sn);
  }
  return sn === 0 ? r : null;
}

async function verifyConsistency(first, second, proof, firstRoot, secondRoot) {
  if (first < 1 || first > second) return false;
  if (first === second) return proof.length === 0 && equal(firstRoot, secondRoot);
  const path = [...proof];
  let m = first;
  while (!odd(m) && m > 1) m = half(m);
  if (m === 1) path.unshift(firstRoot); // first is a power of two: its root is the path's first node
  if (!path.length) return false;
  let fn = first - 1, sn = second - 1;
  while (odd(fn)) { fn = half(fn); sn = half(sn); }
  let fr = path[0], sr = path[0];
  for (const c of path.slice(1)) {
    if (sn === 0) return false;
    if (odd(fn) || fn === sn) {
      fr = await node(c, fr); sr = await node(c, sr);
      if (!odd(fn)) { while (!odd(fn) && fn !== 0) { fn = half(fn); sn = half(sn); } }
    } else {
      sr = await node(sr, c);
    }
    fn = half(fn); sn = half(sn);
  }
  return sn === 0 && equal(fr, firstRoot) && equal(sr, secondRoot);
}

// The last tree this browser verified for a run of this service, with its log's name: the next one must be the
// same log and extend that tree. Keyed by the run, not by the name the checkpoint gives itself, so that a log
// swapped for another (a new name, a shorter history) is caught too.
const memoryKey = (run) => `smalti-verified:${location.origin}:${run}`;
function remembered(run) {
  try { const r = JSON.parse(localStorage.getItem(memoryKey(run))); return r && r.size ? r : null; }
  catch (e) { return null; }
}
function remember(run, checkpoint) {
  localStorage.setItem(memoryKey(run), JSON.stringify({ origin: checkpoint.origin, size: checkpoint.size,
                                                         root: hex(checkpoint.root) }));
}

async function checkAgainstMemory(path, run, checkpoint) {
  const before = remembered(run);
  if (!before) return "first tree this browser verified for this run";
  if (before.origin !== checkpoint.origin) {
    throw new Error(`this browser verified the log ${before.origin} for ${run}; the service now shows ${checkpoint.origin}`);
  }
  if (before.size > checkpoint.size) {
    throw new Error(`this browser verified a tree of ${before.size} entries for ${checkpoint.origin}; the service now shows ${checkpoint.size}: history was cut`);
  }
  if (before.size === checkpoint.size) {
    if (before.root !== hex(checkpoint.root)) throw new Error(`the service shows another tree of ${before.size} entries than this browser verified before: a split view`);
    return `the same tree this browser verified before`;
  }
  const proof = await api(`${path}/proof/consistency?first=${before.size}&second=${checkpoint.size}`);
  if (!Array.isArray(proof.proof) || !await verifyConsistency(before.size, checkpoint.size, proof.proof.map(unhex), unhex(before.root), checkpoint.root)) {
    throw new Error(`the tree of ${checkpoint.size} entries does not extend the tree of ${before.size} this browser verified before`);
  }
  return `consistent with the tree of ${before.size} entries this browser verified before`;
}

// ---------------------------------------------------------------------------------------------- entries

function float32Table(packed) {
  if (!packed || typeof packed.f32 !== "string" || !Array.isArray(packed.shape)) return null;
  const bytes = b64decode(packed.f32);
  const [rows, columns] = packed.shape;
  if (bytes.length !== 4 * rows * columns) throw new Error("a packed table has the wrong length");
  const view = new DataView(bytes.buffer);
  return Array.from({ length: rows }, (_, r) => Array.from({ length: columns }, (_, c) => view.getFloat32(4 * (r * columns + c), true)));
}

function decodeEntry(bytes) {
  const magic = String.fromCharCode(...bytes.slice(0, 4));
  if ((magic !== "TSL2" && magic !== "TSL1") || bytes.length < 44) throw new Error("the entry has no ledger header");
  const view = new DataView(bytes.buffer, bytes.byteOffset);
  const index = view.getUint32(4) * 2 ** 32 + view.getUint32(8);
  return { index, previous: bytes.slice(12, 44), body: JSON.parse(dec.decode(bytes.slice(44))) };
}

function entryFacts(body) {
  const layers = float32Table(body.layers) || (Array.isArray(body.layers) ? body.layers : []);
  const examples = Object.values(body.examples || {}).reduce((n, ids) => n + (Array.isArray(ids) ? ids.length : 0), 0);
  return [["step", String(body.step)], ["loss", String(body.loss)], ["examples", String(examples)],
          ["examples per class", body.counts || {}], ["dropped", String((body.dropped || []).length)],
          ["skipped", String(body.skipped)], ["layers updated", `${layers.filter((r) => r[0] === 1).length} of ${layers.length}`],
          ["class signatures that sent gradient", Object.keys(body.contributions || {}).join(", ") || "none"]];
}

async function verifyEntry() {
  const verdict = $("verdict");
  verdict.className = "verdict";
  verdict.textContent = "checking...";
  $("entry").replaceChildren();
  $("proof-details").textContent = "";
  const { run, opened } = current;
  const fail = (why) => {
    if (!stillOpen(run, opened)) return;
    verdict.className = "verdict bad"; verdict.textContent = `failed: ${why}`;
  };
  try {
    const path = `/api/runs/${encodeURIComponent(run)}`;
    const step = Number($("inspect-step").value);
    if (!Number.isSafeInteger(step) || step < 0) return fail("the step is not a whole number");
    const key = trainerKey();
    localStorage.setItem("smalti-trainer-key", $("trainer-key").value.trim());
    const checkpoint = await verifiedCheckpoint(await api(`${path}/checkpoint`), key);
    const proof = await api(`${path}/proof/inclusion?step=${step}&tree_size=${checkpoint.size}`);
    if (proof.tree_size !== checkpoint.size) return fail("the proof is for another tree size than the checkpoint");
    if (!(Number.isSafeInteger(proof.leaf_index) && proof.leaf_index >= 0 && proof.leaf_index < checkpoint.size)) {
      return fail(`the proof names entry ${proof.leaf_index}, outside the tree of ${checkpoint.size}`);
    }
    const bytes = b64decode(proof.entry_base64);
    const leaf = await sha256(concat(new Uint8Array([0]), bytes));
    const root = await foldInclusion(proof.leaf_index, checkpoint.size, leaf, proof.audit_path.map(unhex));
    if (!root || !equal(root, checkpoint.root)) return fail("the entry's inclusion proof does not lead to the signed root");
    const entry = decodeEntry(bytes);
    if (entry.index !== proof.leaf_index) return fail(`the entry says it is entry ${entry.index}, the proof placed it at ${proof.leaf_index}`);
    if (entry.body.kind !== "step" || entry.body.step !== step) {
      return fail(`asked for step ${step}; the service proved entry ${entry.index}, which is step ${entry.body.step}`);
    }
    const history = await checkAgainstMemory(path, run, checkpoint);
    if (!stillOpen(run, opened)) return; // the auditor opened another run meanwhile: nothing to show or keep
    remember(run, checkpoint);
    verdict.className = "verdict ok";
    verdict.textContent = `verified in your browser: entry ${entry.index} is step ${step}, in ${checkpoint.origin} ` +
                          `at size ${checkpoint.size}, signed by the trainer key you gave; ${history}`;
    facts($("entry"), entryFacts(entry.body));
    $("proof-details").textContent = JSON.stringify({ leaf: hex(leaf), root: hex(root), path: proof.audit_path }, null, 1);
  } catch (error) {
    if (error instanceof SignedOut) throw error;
    fail(error.message);
  }
}

// ---------------------------------------------------------------------------------------------- certificate

// Shown as valid only once its signature verifies here, under the trainer key given, and it certifies this run:
// the log it names is the one this run's checkpoint (verified here too) is signed for, and the one this browser
// verified for the run before (or the verifier key names). What is shown is parsed from the very bytes that were
// verified, not from a copy the service sent alongside.
async function showCertificate(run, opened) {
  const verdict = $("certificate-verdict");
  const path = `/api/runs/${encodeURIComponent(run)}`;
  const answer = await api(`${path}/certificate`);
  const show = (ok, text, rows) => {
    if (!stillOpen(run, opened)) return;
    verdict.className = `verdict ${ok ? "ok" : "bad"}`;
    verdict.textContent = text;
    if (rows) facts($("certificate"), rows); else $("certificate").replaceChildren();
  };
  try {
    const message = b64decode(answer.signed_message_base64);
    const content = JSON.parse(dec.decode(message));
    const key = trainerKey();
    const keyId = hex(await sha256(key.raw)).slice(0, 16);
    if (answer.key_id !== keyId) throw new Error(`signed by key ${answer.key_id}, not by the trainer key you gave (${keyId})`);
    const publicKey = await crypto.subtle.importKey("raw", key.raw, { name: "Ed25519" }, false, ["verify"]);
    if (!/^([0-9a-f]{2})+$/.test(answer.signature || "") ||
        !await crypto.subtle.verify("Ed25519", publicKey, unhex(answer.signature), message)) {
      throw new Error("its signature does not verify under the trainer key you gave");
    }
    const checkpoint = await verifiedCheckpoint(await api(`${path}/checkpoint`), key);
    const before = remembered(run);
    if (before && before.origin !== checkpoint.origin) {
      throw new Error(`this browser verified the log ${before.origin} for ${run}; the service now shows ${checkpoint.origin}`);
    }
    const head = content.ledger_head || {};
    if (head.origin !== checkpoint.origin) {
      throw new Error(`it certifies the run whose log is ${head.origin}, not this run's (${checkpoint.origin})`);
    }
    show(true, "certificate signature verified in your browser, for this run's log", Object.entries(content));
  } catch (error) {
    if (error instanceof SignedOut) throw error;
    show(false, `certificate not verified: ${error.message}`, null);
  }
}

// ---------------------------------------------------------------------------------------------- wiring

$("sign-in-form").addEventListener("submit", (event) => { event.preventDefault(); signIn($("code").value); });
$("sign-out").addEventListener("click", signOut);
$("step").addEventListener("change", guarded(slide));
$("step").addEventListener("input", () => { $("step-label").textContent = `${$("step").value} (release to load)`; });
$("verify").addEventListener("click", guarded(verifyEntry));
$("trainer-key").addEventListener("change", guarded(async () => {
  if (current && current.info.deletion_certificate) await showCertificate(current.run, current.opened);
}));
$("refresh").addEventListener("click", guarded(async () => { await loadRuns(); if (current) await openRun(current.run); }));
$("open-report").addEventListener("click", guarded(async () => {
  // A navigation cannot carry the session's header: the page asks for a one-minute, one-use link instead.
  const ticket = await api(`/api/runs/${encodeURIComponent(current.run)}/report-ticket`);
  window.open(ticket.url, "_blank", "noopener");
}));
$("sign-in-command").textContent = `smalti auditor sign-in ${location.origin} --key auditor.key --open`;

(async () => {
  const code = new URLSearchParams(location.hash.slice(1)).get("code");
  if (code) {
    history.replaceState(null, "", location.pathname); // the code is single-use; keep it out of history
    await signIn(code);
    return;
  }
  try { await start(); } catch (error) { showSignIn(error instanceof SignedOut ? "" : error.message); }
})();
