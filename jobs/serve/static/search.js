"use strict";
// The search page: pickers from /stats, searches by text, by a dropped or picked file, or by a result; the grid.

const form = document.getElementById("search");
const results = document.getElementById("results");
const pickers = { modality: document.getElementById("modality"), model: document.getElementById("model") };
let partitions = [];

async function loadStats() {
  const stats = await api("/stats");
  partitions = stats.embeddings;
  document.getElementById("root").textContent = stats.root;
  const link = document.getElementById("errors-link");
  link.textContent = `errors (${stats.errors.total})`;
  const modalities = [...new Set(partitions.map((p) => p.modality))];
  for (const m of modalities) {
    const rows = Math.max(...partitions.filter((p) => p.modality === m).map((p) => p.rows));
    pickers.modality.append(el("option", { value: m }, `${m} (${rows})`));
  }
  fillModels();
}

function fillModels() {
  const modality = pickers.modality.value;
  const chosen = pickers.model.value;
  const models = [...new Set(partitions.filter((p) => !modality || p.modality === modality).map((p) => p.model))];
  pickers.model.replaceChildren(el("option", { value: "" }, "auto"), ...models.map((m) => el("option", { value: m }, m)));
  if (models.includes(chosen)) pickers.model.value = chosen;
}

// Modality "auto": a typed query searches the images where the store has any (finding pictures by words is what a
// search box is for), else the texts; a file or a result searches its own modality.
function fields(typed) {
  let modality = pickers.modality.value;
  if (!modality && typed) modality = partitions.some((p) => p.modality === "image") ? "image" : "text";
  const out = { modality, model: pickers.model.value, k: document.getElementById("k").value };
  const where = document.getElementById("where").value.trim();
  if (where) out.where = where;
  return out;
}

async function search(body, label) {
  setStatus(`searching ${label} …`);
  results.dataset.state = "searching";
  const started = performance.now();
  try {
    const options = body instanceof FormData
      ? { method: "POST", body }
      : { method: "POST", headers: { "Content-Type": "application/json" }, body: JSON.stringify(body) };
    const answer = await api("/search", options);
    const ms = Math.round(performance.now() - started);
    render(answer, label);
    setStatus(`${answer.results.length} results from ${answer.modality || "-"} / ${answer.model} in ${ms} ms`);
  } catch (err) {
    results.replaceChildren();
    results.dataset.state = "error";
    setStatus(err.message, true);
  }
}

function render(answer, label) {
  const cards = answer.results.map(card);
  results.replaceChildren(el("h2", {}, `results for ${label}`), ...cards);
  results.dataset.state = "done";
}

function card(hit) {
  const like = () => searchLike(hit);
  const media = mediaOf(hit, like);
  const parts = [media];
  if (hit.transcript) parts.push(el("p", { class: "transcript" }, hit.transcript));
  const time = hit.frame_time ?? (hit.columns || {}).frame_time;  // a video frame's time, once video exists
  const name = hit.id.split("/").pop();
  const meta = el("div", { class: "meta" },
    el("span", { class: "score", title: "cosine similarity" }, hit.score.toFixed(3)),
    el("span", { class: "id", title: `${hit.id}\n${hit.uri || ""}\n${hit.model}` },
      time !== undefined && time !== null ? `${name} @ ${Number(time).toFixed(1)} s` : name));
  parts.push(meta, el("button", { type: "button", class: "like", onclick: like }, "more like this"));
  return el("article", { class: `hit ${hit.modality}`, dataset: { key: hit.key, modality: hit.modality } }, ...parts);
}

function mediaOf(hit, like) {
  if (hit.modality === "image" || hit.modality === "video") {
    return el("img", { class: "thumb media", src: `/thumbs/${hit.key}?size=256`, alt: hit.id, loading: "lazy", onclick: like });
  }
  if (hit.modality === "audio") {
    return el("audio", { class: "media-player", controls: true, preload: "metadata", src: `/media/${hit.key}` });
  }
  const snippet = el("pre", { class: "snippet media", onclick: like }, "…");
  fetch(`/media/${hit.key}`).then((r) => (r.ok ? r.text() : Promise.reject(new Error(`HTTP ${r.status}`))))
    .then((text) => { snippet.textContent = text.split("\n").slice(0, 6).join("\n"); })
    .catch((err) => { snippet.textContent = `(text not readable: ${err.message})`; });
  return snippet;
}

function searchLike(hit) {
  pickers.modality.value = hit.modality;
  fillModels();
  pickers.model.value = hit.model;
  search({ ...fields(false), item: hit.key }, `items like ${hit.id}`);
}

function searchFile(file) {
  const body = new FormData();
  for (const [name, value] of Object.entries(fields(false))) body.append(name, value);
  body.append("file", file, file.name);
  search(body, file.name);
}

form.addEventListener("submit", (event) => {
  event.preventDefault();
  const text = document.getElementById("q").value.trim();
  if (!text) return setStatus("type something to search for", true);
  const params = new URLSearchParams({ q: text, ...fields(false) });
  history.replaceState(null, "", `?${params}`);
  search({ ...fields(true), text }, `"${text}"`);
});
pickers.modality.addEventListener("change", fillModels);

const drop = document.getElementById("drop");
const picker = document.getElementById("file");
picker.addEventListener("change", () => { if (picker.files.length) searchFile(picker.files[0]); picker.value = ""; });
drop.addEventListener("dragover", (event) => { event.preventDefault(); drop.classList.add("over"); });
drop.addEventListener("dragleave", () => drop.classList.remove("over"));
drop.addEventListener("drop", (event) => {
  event.preventDefault();
  drop.classList.remove("over");
  if (event.dataTransfer.files.length) searchFile(event.dataTransfer.files[0]);
});
drop.addEventListener("keydown", (event) => { if (event.key === "Enter") picker.click(); });

loadStats().then(() => {
  const params = new URLSearchParams(location.search);
  for (const name of ["modality", "model", "k", "where"]) {
    if (!params.get(name)) continue;
    const input = name === "modality" || name === "model" ? pickers[name] : document.getElementById(name);
    input.value = params.get(name);
    if (name === "modality") fillModels();
  }
  if (params.get("q")) {
    document.getElementById("q").value = params.get("q");
    form.requestSubmit();
  }
}).catch((err) => setStatus(`cannot read the store's stats: ${err.message}`, true));
