// cliprec web page: plain browser JavaScript, no build step, no CDN. Every value from the server is put
// into the page with textContent or as an attribute, never as HTML, and text that a user or the catalog wrote
// goes into a <bdi>, so that a right-to-left override inside it cannot reorder the page around it.
"use strict";

const $ = (id) => document.getElementById(id);
const state = { file: null, product: null, info: null, plotsLoaded: false, busy: false };
const VARIANT_NAMES = { zeroshot: "Zero-shot CLIP", lora: "CLIP + LoRA" };

function el(tag, props = {}, children = []) {
  const node = document.createElement(tag);
  for (const [key, value] of Object.entries(props)) {
    if (key === "class") node.className = value;
    else if (key === "text") node.textContent = value;
    else node.setAttribute(key, value);
  }
  for (const child of children) node.append(child);
  return node;
}

const bdi = (text) => el("bdi", { text });

// prefix is the page's own words, detail (the server's message, which may quote the query) is isolated
function showError(prefix, detail = "") {
  const box = $("error");
  box.replaceChildren(prefix, ...(detail ? [bdi(detail)] : []));
  box.hidden = !prefix;
}

async function getJSON(url, options) {
  let response;
  try {
    response = await fetch(url, options);
  } catch (err) {
    throw new Error(`cannot reach the server (${err.message})`);
  }
  let body = null;
  try {
    body = await response.json();
  } catch (err) {
    body = null;
  }
  if (!response.ok) {
    const why = body && (body.error || body.status) ? body.error || body.status : response.statusText;
    throw new Error(`${response.status}: ${why}`);
  }
  return body;
}

// --- start-up: wait for /healthz, then read /api/info ------------------------------------------------

async function waitUntilReady() {
  const status = $("status");
  for (;;) {
    try {
      const response = await fetch("/healthz");
      const body = await response.json();
      if (response.ok) break;
      if (body.status === "failed") {
        status.textContent = `not ready: ${body.error}`;
        status.className = "status failed";
        return false;
      }
      status.textContent = "loading models and indexes…";
    } catch (err) {
      status.textContent = "waiting for the server…";
    }
    await new Promise((resolve) => setTimeout(resolve, 1000));
  }
  try {
    state.info = await getJSON("/api/info");
  } catch (err) {
    showError("Cannot read /api/info: ", err.message);
    return false;
  }
  const select = $("category");
  select.replaceChildren();
  for (const [name, cat] of Object.entries(state.info.categories)) {
    select.append(el("option", { value: name, text: `${name} (${cat.products} products)` }));
  }
  $("k").max = String(state.info.limits.max_k);
  status.textContent = `ready · ${state.info.model}`;
  status.className = "status ready";
  renderInfo();
  return true;
}

// --- query photo: file input and drag and drop ---------------------------------------------------------

// The preview shows only once the browser has decoded the file: a file that is not an image gets a note
// instead of a broken picture (the server still decides; it may read formats the browser cannot show).
function setFile(file) {
  state.file = file || null;
  showError(""); // an error about the previous photo is no longer true
  const preview = $("preview");
  if (preview.src) URL.revokeObjectURL(preview.src);
  preview.removeAttribute("src");
  preview.hidden = true;
  $("file-note").hidden = true;
  $("drop-hint").hidden = Boolean(state.file);
  $("clear-image").hidden = !state.file;
  if (state.file) {
    $("file-name").replaceChildren(bdi(state.file.name));
    preview.alt = `query photo ${state.file.name}`;
    preview.src = URL.createObjectURL(state.file);
    leaveProductMode();
  } else {
    $("file-name").replaceChildren();
    $("image").value = "";
  }
  updateWeight();
}

function setupPreview() {
  const preview = $("preview");
  preview.addEventListener("load", () => {
    if (state.file) preview.hidden = false;
  });
  preview.addEventListener("error", () => {
    if (!state.file || !preview.getAttribute("src")) return;
    preview.hidden = true;
    $("file-note").hidden = false;
  });
}

function updateWeight() {
  const both = Boolean($("text").value.trim()) && Boolean(state.file);
  $("weight").disabled = !both;
  $("weight-hint").hidden = both;
}

function setupDrop() {
  const drop = $("drop");
  $("image").addEventListener("change", (event) => setFile(event.target.files[0]));
  $("clear-image").addEventListener("click", () => setFile(null));
  setupPreview();
  drop.addEventListener("keydown", (event) => {
    if (event.key === "Enter" || event.key === " ") $("image").click();
  });
  for (const name of ["dragenter", "dragover"]) {
    drop.addEventListener(name, (event) => {
      event.preventDefault();
      drop.classList.add("over");
    });
  }
  for (const name of ["dragleave", "drop"]) {
    drop.addEventListener(name, () => drop.classList.remove("over"));
  }
  drop.addEventListener("drop", (event) => {
    event.preventDefault();
    const file = event.dataTransfer.files[0];
    if (file) setFile(file);
  });
}

// --- "more like this" -------------------------------------------------------------------------------------

function leaveProductMode() {
  state.product = null;
  $("more-like").hidden = true;
}

// A product id means something only in its own category: a new category ends "more like this" and the
// answers shown, which belong to the old one.
function changeCategory() {
  leaveProductMode();
  showError("");
  $("summary").textContent = "";
  for (const variant of ["zeroshot", "lora"]) $(`col-${variant}`).hidden = true;
}

async function moreLikeThis(category, hit) {
  $("text").value = "";
  setFile(null);
  $("category").value = category; // the product's own category, whatever the picker says now
  state.product = hit.id;
  $("more-like").hidden = false;
  $("more-like-img").src = hit.image;
  $("more-like-img").alt = hit.title;
  $("more-like-title").replaceChildren(bdi(hit.title));
  $("more-like-id").replaceChildren(bdi(hit.id));
  $("more-like-detail").textContent = "";
  search();
  try {
    const detail = await getJSON(
      `/api/products/${encodeURIComponent(category)}/${encodeURIComponent(hit.id)}`
    );
    const bits = [detail.store, detail.price != null ? `$${detail.price}` : null,
      detail.average_rating != null ? `★ ${detail.average_rating} (${detail.rating_number})` : null];
    $("more-like-detail").textContent = bits.filter(Boolean).join(" · ");
  } catch (err) {
    $("more-like-detail").textContent = "";
  }
}

// --- search -------------------------------------------------------------------------------------------

async function search() {
  const text = $("text").value.trim();
  if (!state.product && !text && !state.file) {
    showError("Type a query, add a photo, or click a result for “more like this”.");
    return;
  }
  const form = new FormData();
  if (state.product) {
    form.append("product", state.product);
  } else {
    if (text) form.append("text", text);
    if (state.file) form.append("image", state.file, state.file.name);
    if (text && state.file) form.append("weight", $("weight").value);
  }
  const category = $("category").value;
  form.append("category", category);
  form.append("variant", $("variant").value);
  form.append("k", $("k").value || "10");
  state.busy = true;
  $("search-btn").disabled = true;
  $("summary").textContent = "searching…";
  try {
    const answer = await getJSON("/api/search", { method: "POST", body: form });
    showError("");
    renderResults(answer);
  } catch (err) {
    showError("Search failed: ", err.message);
    $("summary").textContent = "";
    for (const variant of ["zeroshot", "lora"]) $(`col-${variant}`).hidden = true; // no stale answers
  } finally {
    state.busy = false;
    $("search-btn").disabled = false;
  }
}

function renderResults(answer) {
  const shared = new Set(answer.shared);
  for (const variant of ["zeroshot", "lora"]) {
    const column = $(`col-${variant}`);
    const hits = answer.results[variant];
    column.hidden = !hits;
    const list = column.querySelector("ol");
    list.replaceChildren();
    if (!hits) continue;
    for (const hit of hits) {
      const isShared = shared.has(hit.id);
      const line = el("div", { class: "line" }, [
        el("span", { class: "rank", text: `#${hit.rank}` }),
        el("span", { class: "score", text: `score ${hit.score.toFixed(3)}` }),
        el("span", { class: "pid" }, [bdi(hit.id)]),
      ]);
      if (isShared) line.append(el("span", { class: "badge", text: "in both" }));
      const item = el("li", {
        class: isShared ? "hit shared" : "hit",
        tabindex: "0",
        "data-id": hit.id,
        title: "more like this",
      }, [
        el("img", { src: hit.image, alt: hit.title, loading: "lazy" }),
        el("div", { class: "meta" }, [el("div", { class: "title" }, [bdi(hit.title)]), line]),
      ]);
      const open = () => moreLikeThis(answer.category, hit);
      item.addEventListener("click", open);
      item.addEventListener("keydown", (event) => {
        if (event.key === "Enter") open();
      });
      list.append(item);
    }
  }
  renderSummary(answer);
}

function renderSummary(answer) {
  const q = answer.query;
  const what = [];
  if (q.kind === "product") what.push("more like ", bdi(q.product));
  if (q.text) what.push("“", bdi(q.text), "”");
  if (q.text && q.image) what.push(" + ");
  if (q.image) what.push("photo ", bdi(q.image));
  const both = Object.keys(answer.results).length > 1;
  $("summary").replaceChildren(
    bdi(answer.category), ": ", ...what, ` · top ${answer.k}` +
    (both ? ` · ${answer.shared.length} found by both variants (marked “in both”)` : "") +
    (q.weight != null ? ` · text weight ${q.weight}` : "") + ` · ${answer.took_ms} ms`
  );
}

// --- plots and metrics ------------------------------------------------------------------------------------

async function loadPlots() {
  if (state.plotsLoaded) return;
  state.plotsLoaded = true;
  const status = $("plots-status");
  const body = $("plots-body");
  if (typeof vegaEmbed === "undefined") {
    status.textContent = "vega-embed did not load.";
    return;
  }
  status.textContent = "loading plots…";
  let answer;
  try {
    answer = await getJSON("/api/plots");
  } catch (err) {
    status.textContent = `Cannot load the plots: ${err.message}`;
    state.plotsLoaded = false;
    return;
  }
  body.replaceChildren();
  for (const plot of answer.plots) {
    const target = el("div", { "data-name": plot.name }); // the spec carries its title
    body.append(el("div", { class: "plot" }, [target]));
    try {
      // DVC's templates are 300 px wide: fill the grid cell instead, legend included
      const spec = { ...plot.spec, width: "container", autosize: { type: "fit-x", contains: "padding" } };
      await vegaEmbed(target, spec, { actions: false, renderer: "svg" });
    } catch (err) {
      target.textContent = `cannot draw: ${err.message}`;
    }
  }
  const errors = answer.errors.length ? ` Problems: ${answer.errors.join("; ")}` : "";
  status.textContent = `${answer.plots.length} plots from dvc.yaml.${errors}`;
  body.dataset.rendered = String(answer.plots.length);
}

const METRIC_COLUMNS = ["recall_at_1", "recall_at_5", "recall_at_10", "mrr", "ndcg_at_10"];

// The one place the page finds a confidence interval in /api/info: the variant's committed metrics file,
// ci95: {<key>: {low, high}} per query mode. {low, high}, or null where there is none.
function confidenceInterval(variantInfo, mode, key) {
  const ci = variantInfo.metrics?.[mode]?.ci95?.[key];
  return ci && typeof ci.low === "number" && typeof ci.high === "number" ? ci : null;
}

function metricCell(variantInfo, mode, key) {
  const value = variantInfo.metrics[mode][key];
  if (typeof value !== "number") return el("td", { text: "–" });
  const ci = confidenceInterval(variantInfo, mode, key);
  return el("td", {}, [
    el("span", { class: "value", text: value.toFixed(3) }),
    ...(ci ? [" ", el("span", { class: "ci", text: `[${ci.low.toFixed(3)}, ${ci.high.toFixed(3)}]` })] : []),
  ]);
}

function metricsTable(variantInfo) {
  const modes = Object.entries(variantInfo.metrics)
    .filter(([, mode]) => mode && typeof mode === "object" && "recall_at_5" in mode);
  const head = el("tr", {}, [
    el("th", { text: "query mode" }), ...METRIC_COLUMNS.map((c) => el("th", { text: c })),
    el("th", { text: "queries" }),
  ]);
  const rows = modes.map(([name, mode]) => el("tr", { "data-mode": name }, [
    el("td", { text: name }), ...METRIC_COLUMNS.map((c) => metricCell(variantInfo, name, c)),
    el("td", { text: mode.queries != null ? String(mode.queries) : "–" }),
  ]));
  const anyCI = modes.some(([name]) => METRIC_COLUMNS.some((c) => confidenceInterval(variantInfo, name, c)));
  const caption = anyCI ? [el("caption", { text: "value [95 % confidence interval]" })] : [];
  return el("table", { class: "metrics" }, [...caption, head, ...rows]);
}

function renderInfo() {
  const info = state.info;
  const body = $("info-body");
  body.replaceChildren(
    el("p", { text: `Model ${info.model} · commit ${info.commit || "unknown"} · fused text weight ${info.text_weight}` })
  );
  for (const [name, cat] of Object.entries(info.categories)) {
    body.append(el("h3", { text: `${name}: ${cat.products} products, ${cat.photos} photos` }));
    for (const [variant, v] of Object.entries(cat.variants)) {
      body.append(el("p", {
        text: `${VARIANT_NAMES[variant] || variant}: index ${v.index}, ${v.ntotal} vectors of ${v.d} dimensions`,
      }));
      if (!v.metrics) {
        body.append(el("p", { class: "hint", text: "no metrics file yet (dvc repro evaluate)" }));
        continue;
      }
      const table = metricsTable(v);
      table.dataset.category = name;
      table.dataset.variant = variant;
      body.append(table);
    }
  }
}

// --- wiring ---------------------------------------------------------------------------------------------

document.addEventListener("DOMContentLoaded", async () => {
  setupDrop();
  $("search-form").addEventListener("submit", (event) => {
    event.preventDefault();
    if (!state.busy) {
      if ($("text").value.trim() || state.file) leaveProductMode();
      search();
    }
  });
  $("text").addEventListener("input", () => {
    updateWeight();
  });
  $("category").addEventListener("change", changeCategory);
  $("weight").addEventListener("input", () => {
    $("weight-out").textContent = Number($("weight").value).toFixed(2);
  });
  $("more-like-clear").addEventListener("click", () => {
    leaveProductMode();
    $("text").focus();
  });
  $("plots").addEventListener("toggle", () => {
    if ($("plots").open) loadPlots();
  });
  $("plots-link").addEventListener("click", () => {
    $("plots").open = true;
  });
  const openPlotsOnHash = () => {
    if (location.hash === "#plots") $("plots").open = true;
  };
  window.addEventListener("hashchange", openPlotsOnHash);
  openPlotsOnHash();
  await waitUntilReady();
});
