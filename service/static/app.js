// Person re-ID search page. Uses only the public HTTP API; no build step.
"use strict";

const state = {
  key: sessionStorage.getItem("reid-api-key") || "",
  offset: 0,
  pageSize: 24,
  branches: 1,
  imageUrls: new Map(),
};
const $ = (id) => document.getElementById(id);

async function api(path, options = {}) {
  const headers = new Headers(options.headers || {});
  if (state.key) headers.set("X-API-Key", state.key);
  const response = await fetch(path, { ...options, headers });
  if (response.status === 401) {
    $("key-dialog").hidden = false;
    throw new Error("this service needs an API key");
  }
  if (!response.ok) {
    let message = response.statusText;
    try { message = (await response.json()).error.message; } catch (_) { /* not our JSON error */ }
    throw new Error(message);
  }
  return response;
}

async function galleryImageUrl(id) {
  if (!state.imageUrls.has(id)) {
    const blob = await (await api(`gallery/${id}/image`)).blob();
    state.imageUrls.set(id, URL.createObjectURL(blob));
  }
  return state.imageUrls.get(id);
}

function element(tag, attributes = {}, children = []) {
  const node = document.createElement(tag);
  for (const [name, value] of Object.entries(attributes)) {
    if (name === "text") node.textContent = value;
    else if (name.startsWith("data-") || name === "class" || name === "alt" || name === "src" || name === "type") node.setAttribute(name, value);
    else node[name] = value;
  }
  children.forEach((child) => node.append(child));
  return node;
}

function fmt(value) { return value === null || value === undefined ? "–" : value; }

// ---- model and provider ----
async function loadModelInfo() {
  try {
    const [model, ready] = await Promise.all([(await api("model")).json(), (await api("readyz")).json()]);
    state.branches = model.num_branches;
    const pct = (x) => (x === undefined ? "–" : `${(100 * x).toFixed(1)}%`);
    // reid.evaluation: {set name: {"all": {rank1, mAP, ...}, "branch1": ...}}, one entry per evaluation set
    const figures = Object.entries(model.evaluation || {})
      .map(([set, f]) => `${set} rank-1 ${pct(f.all && f.all.rank1)}, mAP ${pct(f.all && f.all.mAP)}`).join("; ");
    $("model-info").textContent =
      `${model.architecture} · ${model.backbone} · ${model.num_branches} branches × ${model.branch_dim} = ${model.embedding_dim}-d · ` +
      `trained on ${model.training_data || "?"} (${figures || "no figures"}) · ` +
      `ONNX Runtime: ${ready.provider.active}${ready.provider.fell_back ? " (fell back!)" : ""} · gallery ${ready.gallery_size}`;
    // CASN's pairwise stage is offered only when the server loaded a pair head for this model
    $("pair-attention").disabled = !model.pair_head;
    $("pair-attention-label").hidden = !model.pair_head;
    const select = $("overlay-kind");
    select.replaceChildren(element("option", { value: "aggregate", text: "aggregate RAM" }));
    for (let i = 0; i < model.num_branches; i++) select.append(element("option", { value: String(i), text: `branch ${i + 1}` }));
  } catch (error) {
    $("model-info").textContent = `model: ${error.message}`;
  }
}

// ---- query ----
// The page asks for grids only (overlays=false) and draws them here, with the server's colour ramp
// (service/heatmaps.py): a few kB a match instead of a PNG per map, and no server CPU spent drawing.
const RAMP = [[48, 18, 59], [40, 120, 230], [30, 200, 200], [250, 220, 60], [230, 60, 20], [122, 4, 3]];
const MAX_OVERLAY_SIDE = 256;

// A map's colours at the grid's own resolution: min-max scaled (a RAM), or as it is on [0, 1] (attention).
function heatCanvas(grid, unitScale) {
  const h = grid.length, w = grid[0].length, values = grid.flat();
  const low = Math.min(...values), high = Math.max(...values);
  const canvas = element("canvas", { width: w, height: h });
  const context = canvas.getContext("2d");
  const pixels = context.createImageData(w, h);
  values.forEach((value, i) => {
    const t = unitScale ? Math.min(1, Math.max(0, value)) : high - low < 1e-12 ? 0 : (value - low) / (high - low);
    const position = t * (RAMP.length - 1), k = Math.min(Math.floor(position), RAMP.length - 2), f = position - k;
    for (let c = 0; c < 3; c++) pixels.data[4 * i + c] = RAMP[k][c] * (1 - f) + RAMP[k + 1][c] * f;
    pixels.data[4 * i + 3] = 255;
  });
  context.putImageData(pixels, 0, 0);
  return canvas;
}

// The map stretched, smoothly, to the image's own proportions, so that it lies exactly over it.
function heatUrl(grid, image, unitScale = false) {
  const scale = Math.min(1, MAX_OVERLAY_SIDE / Math.max(image.naturalWidth, image.naturalHeight));
  const canvas = element("canvas", { width: Math.max(1, Math.round(image.naturalWidth * scale)), height: Math.max(1, Math.round(image.naturalHeight * scale)) });
  const context = canvas.getContext("2d");
  context.imageSmoothingEnabled = true;
  context.imageSmoothingQuality = "high";
  context.drawImage(heatCanvas(grid, unitScale), 0, 0, canvas.width, canvas.height);
  return canvas.toDataURL("image/png");
}

function whenLoaded(image) {
  return image.complete && image.naturalWidth ? Promise.resolve(image) : new Promise((resolve) => image.addEventListener("load", () => resolve(image), { once: true }));
}

async function drawOverlay(box, grid, unitScale = false) {
  const image = await whenLoaded(box.querySelector("img:not(.overlay)"));
  box.querySelector("img.overlay").src = heatUrl(grid, image, unitScale);
}

function selectedGrid(heatmap) {
  const kind = $("overlay-kind").value;
  return kind === "aggregate" ? heatmap.grid : heatmap.branch_grids[Number(kind)];
}

function applyOverlays() {
  const opacity = $("opacity").value;
  const on = $("overlay-all").checked;
  document.querySelectorAll("#results .card").forEach((card) => {
    const box = card.querySelector(".stack");
    if (!box || !card.heatmap) return;
    drawOverlay(box, selectedGrid(card.heatmap));
    box.querySelector("img.overlay").style.opacity = on && !card.classList.contains("overlay-off") ? opacity : 0;
  });
}

function stack(baseUrl, heatmap, alt) {
  const box = element("div", { class: "stack" }, [element("img", { src: baseUrl, alt })]);
  if (heatmap) box.append(element("img", { class: "overlay", alt: `${alt} RAM overlay` }));
  return box;
}

// Small maps shown beside the RAM, each over its image: a model's own attention maps (CLPD's parts, on
// [0, 1]), or CASN's pair of maps.
function strip(kind, title, items) {
  const shown = items.filter((item) => item.grid);
  if (!shown.length) return "";
  return element("div", { class: `strip ${kind}`, title }, shown.map((item) => {
    const box = element("div", { class: "stack", title: item.label }, [
      element("img", { src: item.url, alt: item.label }), element("img", { class: "overlay", alt: `${item.label} map` })]);
    drawOverlay(box, item.grid, item.unitScale);
    return box;
  }));
}

function attentionStrip(heatmap, url) {
  const grids = (heatmap && heatmap.attention_grids) || [];
  return strip("parts", "the model's part attention maps", grids.map((grid, i) => ({ url, grid, unitScale: true, label: `part ${i + 1}` })));
}

function pairStrip(pair, queryUrl, matchUrl) {
  if (!pair) return "";
  return strip("pair", "CASN pairwise attention: the query and this match, as the pair head sees them", [
    { url: queryUrl, grid: pair.query_grid, label: "query in this pair (M_q)" },
    { url: matchUrl, grid: pair.gallery_grid, label: "match in this pair (M_g)" }]);
}

function distanceText(match) {
  if (match.pair_distance != null) return ` · d_pair ${match.pair_distance.toFixed(3)}`;
  return match.rerank_distance == null ? "" : ` · d* ${match.rerank_distance.toFixed(3)}`;
}

function matchCard(match, imageUrl, queryPerson, queryUrl) {
  const same = queryPerson && match.person_id === queryPerson;
  const toggle = element("button", { type: "button", class: "secondary toggle-overlay", text: "overlay" });
  const card = element("figure", { class: `card match${same ? " same-person" : ""}`, "data-id": match.id, "data-rank": match.rank, "data-score": match.score }, [
    stack(imageUrl, match.heatmap, `match ${match.rank}`),
    attentionStrip(match.heatmap, imageUrl),
    pairStrip(match.pair_attention, queryUrl, imageUrl),
    element("figcaption", {}, [
      element("div", { text: `#${match.rank} · ${match.score.toFixed(3)}${distanceText(match)}` }),
      element("div", { class: "muted", text: `person ${fmt(match.person_id)} · cam ${fmt(match.camera_id)}` }),
      match.same_person == null ? "" : element("div", {
        class: "muted verdict", title: "the score against the model's same-person threshold, which was set on other cameras: a guide on yours, not a verdict",
        text: `score ${match.same_person ? "above" : "below"} the threshold`,
      }),
      element("span", { class: "badge", text: "same id", title: "enrolled with the query person id you gave" }),
      match.heatmap ? toggle : "",
    ]),
  ]);
  card.heatmap = match.heatmap;
  toggle.addEventListener("click", () => { card.classList.toggle("overlay-off"); applyOverlays(); });
  return card;
}

async function runQuery(event) {
  event.preventDefault();
  const files = [...$("query-file").files];
  if (!files.length) { $("query-status").textContent = "pick a query image first"; return; }
  const form = new FormData();
  files.forEach((file) => form.append("image", file));
  if (files.length > 1) form.append("aggregate", $("aggregate").value);
  if ($("group-by-person").checked) form.append("group_by", "person");
  form.append("top_k", $("top-k").value || "10");
  form.append("overlays", "false");  // grids only: the page draws them
  if ($("exclude-camera").value) form.append("exclude_camera_id", $("exclude-camera").value);
  if ($("rerank").checked) form.append("rerank", "true");
  if ($("pair-attention").checked) form.append("pair_attention", "true");
  $("query-status").textContent = "searching…";
  try {
    const body = await (await api("query", { method: "POST", body: form })).json();
    const queryPerson = $("query-person").value.trim();
    const urls = await Promise.all(body.matches.map((m) => galleryImageUrl(m.id)));
    const queryUrl = URL.createObjectURL(files[0]);
    const cards = body.matches.map((m, i) => matchCard(m, urls[i], queryPerson, queryUrl));
    $("matches").replaceChildren(...cards);
    const queryCard = $("query-card");
    // a track shows its first image, with that image's map for the features its matches were scored with
    const heatmap = body.track_heatmaps ? body.track_heatmaps[0] : body.query_heatmap;
    const caption = body.track_size ? `track of ${body.track_size} images (${body.aggregate}) · first image's RAM` : "query · its own heatmap";
    queryCard.replaceChildren(stack(queryUrl, heatmap, "query"), attentionStrip(heatmap, queryUrl),
      element("figcaption", { text: caption }));
    queryCard.heatmap = heatmap;
    queryCard.hidden = false;
    applyOverlays();
    const track = body.track_size ? ` for a track of ${body.track_size}` : "";
    $("query-status").textContent = `${body.matches.length} matches${track} from ${body.gallery_size} in ${body.timing_ms.total.toFixed(0)} ms`;
  } catch (error) {
    $("query-status").textContent = `query failed: ${error.message}`;
  }
}

// ---- gallery ----
async function loadGallery() {
  try {
    const page = await (await api(`gallery?limit=${state.pageSize}&offset=${state.offset}`)).json();
    const cards = await Promise.all(page.items.map(async (item) => {
      const remove = element("button", { type: "button", class: "secondary delete", text: "delete" });
      remove.addEventListener("click", async () => {
        if (!window.confirm(`Delete item #${item.id} (person ${fmt(item.person_id)}) from the gallery? This cannot be undone.`)) return;
        try { await api(`gallery/${item.id}`, { method: "DELETE" }); await loadGallery(); } catch (error) { $("enroll-status").textContent = error.message; }
      });
      return element("figure", { class: "card gallery-item", "data-id": item.id }, [
        element("div", { class: "stack" }, [element("img", { src: await galleryImageUrl(item.id), alt: `item ${item.id}` })]),
        element("figcaption", {}, [element("div", { class: "muted", text: `#${item.id} · ${fmt(item.person_id)} · ${fmt(item.camera_id)}` }), remove]),
      ]);
    }));
    $("gallery").replaceChildren(...cards);
    const last = Math.min(page.total, state.offset + page.items.length);
    $("page-info").textContent = page.total ? `${state.offset + 1}–${last} of ${page.total}` : "empty gallery";
    $("prev-page").disabled = state.offset === 0;
    $("next-page").disabled = last >= page.total;
  } catch (error) {
    $("page-info").textContent = `gallery: ${error.message}`;
  }
}

async function enroll(event) {
  event.preventDefault();
  const files = $("enroll-files").files;
  if (!files.length) { $("enroll-status").textContent = "pick one or more images"; return; }
  const form = new FormData();
  for (const file of files) form.append("images", file);
  if ($("enroll-person").value) form.append("person_id", $("enroll-person").value);
  if ($("enroll-camera").value) form.append("camera_id", $("enroll-camera").value);
  try {
    const body = await (await api("gallery", { method: "POST", body: form })).json();
    $("enroll-status").textContent = `enrolled ${body.ids.length}: ids ${body.ids.join(", ")}`;
    $("enroll-form").reset();
    await loadGallery();
    await loadModelInfo();
  } catch (error) {
    $("enroll-status").textContent = `enrol failed: ${error.message}`;
  }
}

function wire() {
  $("query-form").addEventListener("submit", runQuery);
  $("enroll-form").addEventListener("submit", enroll);
  ["opacity", "overlay-kind", "overlay-all"].forEach((id) => $(id).addEventListener("input", applyOverlays));
  $("overlay-kind").addEventListener("change", applyOverlays);
  // two re-rankings of one shortlist: the server takes one at a time
  $("rerank").addEventListener("change", () => { if ($("rerank").checked) $("pair-attention").checked = false; });
  $("pair-attention").addEventListener("change", () => { if ($("pair-attention").checked) $("rerank").checked = false; });
  $("prev-page").addEventListener("click", () => { state.offset = Math.max(0, state.offset - state.pageSize); loadGallery(); });
  $("next-page").addEventListener("click", () => { state.offset += state.pageSize; loadGallery(); });
  const zone = $("drop-zone");
  zone.addEventListener("dragover", (e) => { e.preventDefault(); zone.classList.add("over"); });
  zone.addEventListener("dragleave", () => zone.classList.remove("over"));
  zone.addEventListener("drop", (e) => {
    e.preventDefault();
    zone.classList.remove("over");
    $("query-file").files = e.dataTransfer.files;
  });
  $("key-form").addEventListener("submit", (e) => {
    e.preventDefault();
    state.key = $("key-input").value;
    sessionStorage.setItem("reid-api-key", state.key);
    $("key-dialog").hidden = true;
    loadModelInfo();
    loadGallery();
  });
}

wire();
loadModelInfo();
loadGallery();
