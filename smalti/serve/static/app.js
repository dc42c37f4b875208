// The Smalti audit UI: plain JavaScript, no library, nothing fetched from anywhere but this service.
// Proofs are checked here, with the browser's own WebCrypto (SHA-256 for the Merkle path, Ed25519 for the
// checkpoint's note signature); "verified in your browser" is shown only when this code computed it.
"use strict";

const $ = (id) => document.getElementById(id);
const enc = new TextEncoder();
const SVG = "http://www.w3.org/2000/svg";
let current = null; // {run, info, contributions}

function b64decode(text) { return Uint8Array.from(atob(text), (c) => c.charCodeAt(0)); }
function b64encode(bytes) { return btoa(String.fromCharCode(...bytes)); }
function b64url(text) { return b64decode(text.replace(/-/g, "+").replace(/_/g, "/") + "===".slice((text.length + 3) % 4)); }
function hex(bytes) { return Array.from(bytes, (b) => b.toString(16).padStart(2, "0")).join(""); }
function unhex(text) { return Uint8Array.from(text.match(/../g) || [], (h) => parseInt(h, 16)); }
function concat(...parts) {
  const out = new Uint8Array(parts.reduce((n, p) => n + p.length, 0));
  let at = 0; for (const p of parts) { out.set(p, at); at += p.length; }
  return out;
}
async function sha256(bytes) { return new Uint8Array(await crypto.subtle.digest("SHA-256", bytes)); }
function equal(a, b) { return a.length === b.length && a.every((x, i) => x === b[i]); }
function el(tag, attrs = {}, text) {
  const node = document.createElementNS(SVG, tag);
  for (const [k, v] of Object.entries(attrs)) node.setAttribute(k, v);
  if (text !== undefined) node.textContent = text;
  return node;
}

async function api(path) {
  const response = await fetch(path, { credentials: "same-origin" });
  if (!response.ok) {
    let message = response.statusText;
    try { message = (await response.json()).error; } catch (e) { /* not JSON */ }
    throw new Error(`${response.status}: ${message}`);
  }
  return response.headers.get("content-type").startsWith("application/json") ? response.json() : response.text();
}

// ---------------------------------------------------------------------------------------------- login

async function login() {
  const status = $("login-status");
  try {
    const pem = $("key-pem").value.trim();
    const der = b64decode(pem.replace(/-----[^-]+-----/g, "").replace(/\s+/g, ""));
    const key = await crypto.subtle.importKey("pkcs8", der, { name: "Ed25519" }, true, ["sign"]);
    const publicRaw = b64url((await crypto.subtle.exportKey("jwk", key)).x);
    const keyId = hex(await sha256(publicRaw)).slice(0, 16);
    const { challenge } = await api("/api/login/challenge");
    const signature = new Uint8Array(await crypto.subtle.sign("Ed25519", key, enc.encode(`smalti-login/v1\n${challenge}`)));
    const who = await api(`/api/login?challenge=${challenge}&key_id=${keyId}&signature=${encodeURIComponent(b64encode(signature))}`);
    $("key-pem").value = "";
    $("who").textContent = `signed in as ${who.reader} (key ${keyId})`;
    $("login").hidden = true;
    $("app").hidden = false;
    await loadRuns();
  } catch (error) {
    status.textContent = `login failed: ${error.message}`;
  }
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
    for (const value of [run.run, run.entries, run.final ? "yes" : "in progress", run.signed || "-"]) {
      const cell = document.createElement("td"); cell.textContent = value; row.appendChild(cell);
    }
    row.addEventListener("click", () => openRun(run.run));
    body.appendChild(row);
  }
  await drawLineage(runs);
}

async function drawLineage(runs) {
  const svg = $("lineage");
  svg.replaceChildren();
  const infos = await Promise.all(runs.map((r) => api(`/api/runs/${encodeURIComponent(r.run)}`).catch(() => null)));
  const x = (i) => 20 + i * 150;
  runs.forEach((run, i) => {
    const info = infos[i];
    for (const link of (info && info.lineage) || []) {
      const parent = runs.findIndex((r) => link.run.endsWith(`/${r.run}`));
      if (parent >= 0) svg.appendChild(el("line", { x1: x(parent) + 60, y1: 40, x2: x(i), y2: 40, stroke: "#888",
                                                    class: "edge" }));
    }
    svg.appendChild(el("rect", { x: x(i), y: 28, width: 120, height: 24, fill: "#dde", class: "node" }));
    svg.appendChild(el("text", { x: x(i) + 6, y: 44 }, run.run));
  });
}

async function openRun(name) {
  const path = `/api/runs/${encodeURIComponent(name)}`;
  const [info, contributions, entropy] = await Promise.all([api(path), api(`${path}/contributions`), api(`${path}/entropy`)]);
  current = { run: name, info, contributions };
  $("run").hidden = false;
  $("run-title").textContent = name;
  $("run-summary").textContent = `${info.steps} steps, ${info.head.size} entries, final: ${info.head.final}`;
  const slider = $("step");
  slider.max = Math.max(1, contributions.steps.length);
  slider.value = slider.max;
  drawHeatmap();
  drawEntropy(entropy);
  $("certificate").textContent = info.deletion_certificate
    ? JSON.stringify(await api(`${path}/certificate`), null, 1) : "none";
}

function drawHeatmap() {
  const { info, contributions } = current;
  const upTo = Number($("step").value);
  $("step-label").textContent = upTo;
  const layers = info.layers, classes = info.classes;
  const sums = layers.map(() => classes.map(() => 0));
  for (const entry of contributions.steps.slice(0, upTo)) {
    for (const [signature, cells] of Object.entries(entry.contributions)) {
      const members = signature.split("+").map((c) => classes.indexOf(c)).filter((c) => c >= 0);
      for (const [layer, , share] of cells) for (const c of members) sums[layer][c] += share / members.length;
    }
  }
  const largest = Math.max(1e-12, ...sums.flat());
  const size = 14, left = 160, top = 150;
  const svg = $("heatmap");
  svg.replaceChildren();
  svg.setAttribute("width", left + classes.length * size + 20);
  svg.setAttribute("height", top + layers.length * size + 10);
  classes.forEach((cls, j) => {
    const cx = left + j * size + 10;
    svg.appendChild(el("text", { x: cx, y: top - 4, transform: `rotate(-60 ${cx} ${top - 4})` }, cls));
  });
  layers.forEach((layer, i) => {
    svg.appendChild(el("text", { x: 0, y: top + i * size + 10 }, layer));
    classes.forEach((cls, j) => {
      const value = sums[i][j] / largest;
      const cell = el("rect", { x: left + j * size, y: top + i * size, width: size - 1, height: size - 1,
                                fill: value > 0 ? `rgba(20, 60, 160, ${0.1 + 0.9 * value})` : "#f4f4f4",
                                class: "cell", "data-layer": layer, "data-class": cls });
      cell.appendChild(el("title", {}, `${layer} / ${cls}: ${sums[i][j].toFixed(4)}`));
      svg.appendChild(cell);
    });
  });
}

function drawEntropy(entropy) {
  const svg = $("entropy");
  svg.replaceChildren();
  if (!entropy.profiles.length) { svg.appendChild(el("text", { x: 10, y: 20 }, "no entropy profiles recorded")); return; }
  const steps = entropy.profiles.map((p) => p.step);
  // each profile: [classes][layers]; the mean over classes per layer
  const series = entropy.layers.map((_, l) => entropy.profiles.map((p) => {
    const values = p.entropy.map((row) => row[l]).filter((v) => v !== null && Number.isFinite(v));
    return values.length ? values.reduce((a, b) => a + b, 0) / values.length : null;
  }));
  const all = series.flat().filter((v) => v !== null);
  const low = Math.min(...all), high = Math.max(...all, low + 1e-9);
  const x = (s) => 40 + (steps.length > 1 ? (s - steps[0]) / (steps[steps.length - 1] - steps[0]) : 0.5) * 640;
  const y = (v) => 200 - ((v - low) / (high - low)) * 180;
  series.forEach((values, l) => {
    const color = `hsl(${(l * 47) % 360}, 60%, 40%)`;
    const points = values.map((v, i) => (v === null ? null : [x(steps[i]), y(v)])).filter(Boolean);
    svg.appendChild(el("polyline", { points: points.map((p) => p.join(",")).join(" "), fill: "none", stroke: color,
                                     class: "entropy-line" }));
    for (const [px, py] of points) svg.appendChild(el("circle", { cx: px, cy: py, r: 3, fill: color }));
    svg.appendChild(el("text", { x: 690, y: 20 + l * 14, fill: color }, entropy.layers[l]));
  });
  svg.appendChild(el("text", { x: 40, y: 215 }, `steps ${steps[0]}..${steps[steps.length - 1]}; mean over classes`));
}

// ---------------------------------------------------------------------------------------------- inspector

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
  return { text, signatures, origin: lines[0], size: Number(lines[1]), root: b64decode(lines[2]) };
}

async function foldPath(index, size, leaf, path) {
  let fn = index, sn = size - 1, r = leaf;
  for (const p of path) {
    if (sn === 0) return null;
    if ((fn & 1) || fn === sn) {
      r = await sha256(concat(new Uint8Array([1]), p, r));
      if (!(fn & 1)) { while ((fn & 1) === 0 && fn !== 0) { fn >>= 1; sn >>= 1; } }
    } else {
      r = await sha256(concat(new Uint8Array([1]), r, p));
    }
    fn >>= 1; sn >>= 1;
  }
  return sn === 0 ? r : null;
}

async function verifyEntry() {
  const verdict = $("verdict");
  verdict.className = "verdict";
  verdict.textContent = "checking...";
  const fail = (why) => { verdict.className = "verdict bad"; verdict.textContent = `failed: ${why}`; };
  try {
    const path = `/api/runs/${encodeURIComponent(current.run)}`;
    const step = Number($("inspect-step").value);
    const [proof, note] = await Promise.all([api(`${path}/proof/inclusion?step=${step}`), api(`${path}/checkpoint`)]);
    const [name, keyIdHex, keyB64] = $("verifier-key").value.trim().split(/\+(.*?)\+(.*)/s).filter((s) => s !== "");
    const keyBytes = b64decode(keyB64 || "");
    if (keyBytes.length !== 33 || keyBytes[0] !== 1) return fail("the verifier key is not an Ed25519 note key");
    const publicRaw = keyBytes.slice(1);
    const keyId = (await sha256(concat(enc.encode(`${name}\n`), new Uint8Array([1]), publicRaw))).slice(0, 4);
    if (hex(keyId) !== keyIdHex) return fail("the verifier key's ID does not match its name and key");
    const checkpoint = parseNote(note);
    const line = checkpoint.signatures.find((s) => s.name === name && equal(s.bytes.slice(0, 4), keyId));
    if (!line) return fail(`the checkpoint carries no signature by ${name}`);
    const publicKey = await crypto.subtle.importKey("raw", publicRaw, { name: "Ed25519" }, false, ["verify"]);
    if (!await crypto.subtle.verify("Ed25519", publicKey, line.bytes.slice(4), enc.encode(checkpoint.text))) {
      return fail("the checkpoint's signature does not verify");
    }
    if (proof.tree_size !== checkpoint.size) return fail("the proof is for another tree size than the checkpoint");
    const entry = b64decode(proof.entry_base64);
    const leaf = await sha256(concat(new Uint8Array([0]), entry));
    const root = await foldPath(proof.leaf_index, proof.tree_size, leaf, proof.audit_path.map(unhex));
    if (!root || !equal(root, checkpoint.root)) return fail("the entry's inclusion proof does not lead to the signed root");
    verdict.className = "verdict ok";
    verdict.textContent = `verified in your browser: entry ${proof.leaf_index} (step ${step}) is in ${checkpoint.origin} ` +
                          `at size ${checkpoint.size}, signed by ${name}`;
    $("proof-details").textContent = JSON.stringify({ leaf: hex(leaf), root: hex(root), path: proof.audit_path }, null, 1);
  } catch (error) {
    fail(error.message);
  }
}

$("key-file").addEventListener("change", async (event) => { $("key-pem").value = await event.target.files[0].text(); });
$("login-button").addEventListener("click", login);
$("step").addEventListener("input", drawHeatmap);
$("verify").addEventListener("click", verifyEntry);
$("refresh").addEventListener("click", async () => { await loadRuns(); await openRun(current.run); });
api("/api/runs").then(() => { $("login").hidden = true; $("app").hidden = false; loadRuns(); }).catch(() => {});
