// gpserve's status page: polls /_status/data and fills the page in. Every string from
// the server (model and tensor names are data) goes in as text, never as markup.
"use strict";

const POLL_MS = 1500;
const $ = (selector, root = document) => root.querySelector(selector);

function text(element, value) {
  element.textContent = value === null || value === undefined ? "-" : String(value);
}

function cells(row, values) {
  for (const value of values) {
    text(row.insertCell(), value);
  }
}

function fill(tbody, rows) {
  tbody.replaceChildren();
  for (const values of rows) {
    cells(tbody.insertRow(), values);
  }
}

function rate(value) {
  return value === null ? "-" : value.toLocaleString(undefined, {maximumFractionDigits: 1});
}

function bars(container, sizes) {
  container.replaceChildren();
  const entries = Object.entries(sizes);
  const most = Math.max(1, ...entries.map(([, n]) => n));
  for (const [size, count] of entries) {
    const bar = document.createElement("div");
    bar.className = "bar";
    bar.style.height = `${(100 * count) / most}%`;
    bar.title = `${count} batches of ${size} rows`;
    const label = document.createElement("span");
    text(label, size);
    bar.append(label);
    container.append(bar);
  }
}

function modelSection(model) {
  const key = `model-${model.name}-${model.version}`;
  let section = document.getElementById(key);
  if (!section) {
    section = $("#model-template").content.firstElementChild.cloneNode(true);
    section.id = key;
    $("#models").append(section);
  }
  return section;
}

function showModel(model) {
  const s = modelSection(model);
  text($(".name", s), model.name);
  text($(".version", s), `version ${model.version}`);
  text($(".state", s), model.state);
  $(".state", s).className = `state ${model.state}`;
  text($(".what", s), `${model.backend}, in the ${model.placement}`);
  text($(".requests", s), rate(model.requests_per_s));
  text($(".rows", s), rate(model.rows_per_s));
  text($(".failed", s), rate(model.failed_per_s));
  text($(".queue", s), model.queue_rows);
  const b = model.batching;
  text($(".batching", s), b.enabled ? `up to ${b.max_batch} rows, ${b.max_delay_ms} ms` : "off");
  text($(".invariance", s), `${b.verdict} (largest difference ${b.max_difference})`);
  text($(".cache", s), model.cache === null ? "off" : model.cache.map(
    (t) => `${t.tier}: ${t.hit_rate === null ? "-" : (100 * t.hit_rate).toFixed(1) + "%"} ` +
           `hits (${t.hits} hits, ${t.misses} misses)`).join("; "));
  const padded = model.batched_rows + model.padded_rows;
  text($(".padding", s), padded ? `${((100 * model.padded_rows) / padded).toFixed(1)}% of rows run` : "none");
  bars($(".bars", s), model.batch_sizes);
  fill($(".io tbody", s), [
    ...model.inputs.map((t) => ["input", t.name, t.type, JSON.stringify(t.shape)]),
    ...model.outputs.map((t) => ["output", t.name, t.type, JSON.stringify(t.shape)])]);
  fill($(".workers tbody", s), model.workers.map((w) => [
    w.index, w.pid, w.ready ? "ready" : "starting", w.runs]));
}

function show(data) {
  const server = data.server;
  text($("#version"), server.version);
  const names = data.models.map((m) => `${m.name} ${m.version}`).join(", ");
  text($("#summary"), `Serving ${data.models.length} model version(s): ${names || "none"}. ` +
       `Front ${server.this_front} answered.`);
  const ms = (v) => (v === null ? "-" : `≤ ${v} ms`);
  text($("#p50"), ms(server.latency_ms.p50));
  text($("#p99"), ms(server.latency_ms.p99));
  text($("#restarts"), `${server.restarts.workers} workers, ${server.restarts.fronts} fronts`);
  const errors = Object.entries(server.errors_last_minute);
  text($("#errors"), errors.length ? errors.map(([k, n]) => `${k}: ${n}`).join(", ") : "none");
  fill($("#fronts tbody"), server.fronts.map((f) => [f.index, f.pid, f.state, f.connections]));
  const shown = new Set(data.models.map((m) => `model-${m.name}-${m.version}`));
  for (const section of document.querySelectorAll("section.model")) {
    if (!shown.has(section.id)) section.remove();
  }
  data.models.forEach(showModel);
}

async function poll() {
  try {
    const response = await fetch("/_status/data", {cache: "no-store"});
    if (!response.ok) throw new Error(`HTTP ${response.status}`);
    show(await response.json());
    $("#problem").hidden = true;
  } catch (e) {
    text($("#problem"), `Cannot read the server's figures (${e.message}); trying again.`);
    $("#problem").hidden = false;
  }
  setTimeout(poll, POLL_MS);
}

poll();
