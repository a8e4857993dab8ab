// cliprec web page: plain browser JavaScript, no build step, no CDN. Every value from the server is put
// into the page with textContent or as an attribute, never as HTML.
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

function showError(message) {
  const box = $("error");
  box.textContent = message;
  box.hidden = !message;
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
    showError(`Cannot read /api/info: ${err.message}`);
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

function setFile(file) {
  state.file = file || null;
  const preview = $("preview");
  if (preview.src) URL.revokeObjectURL(preview.src);
  if (state.file) {
    preview.src = URL.createObjectURL(state.file);
    preview.alt = `query photo ${state.file.name}`;
    preview.hidden = false;
    $("drop-hint").hidden = true;
    $("clear-image").hidden = false;
    leaveProductMode();
  } else {
    preview.removeAttribute("src");
    preview.hidden = true;
    $("drop-hint").hidden = false;
    $("clear-image").hidden = true;
    $("image").value = "";
  }
  updateWeight();
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

async function moreLikeThis(category, hit) {
  state.product = hit.id;
  $("text").value = "";
  setFile(null);
  state.product = hit.id; // setFile(null) does not touch it, but be explicit: this search is by product
  $("more-like").hidden = false;
  $("more-like-img").src = hit.image;
  $("more-like-img").alt = hit.title;
  $("more-like-title").textContent = hit.title;
  $("more-like-id").textContent = hit.id;
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
    showError(`Search failed: ${err.message}`);
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
        el("span", { class: "pid", text: hit.id }),
      ]);
      if (isShared) line.append(el("span", { class: "badge", text: "in both" }));
      const item = el("li", {
        class: isShared ? "hit shared" : "hit",
        tabindex: "0",
        "data-id": hit.id,
        title: "more like this",
      }, [
        el("img", { src: hit.image, alt: hit.title, loading: "lazy" }),
        el("div", { class: "meta" }, [el("div", { class: "title", text: hit.title }), line]),
      ]);
      const open = () => moreLikeThis(answer.category, hit);
      item.addEventListener("click", open);
      item.addEventListener("keydown", (event) => {
        if (event.key === "Enter") open();
      });
      list.append(item);
    }
  }
  const q = answer.query;
  const what = q.kind === "product" ? `more like ${q.product}`
    : [q.text ? `“${q.text}”` : null, q.image ? `photo ${q.image}` : null].filter(Boolean).join(" + ");
  const both = Object.keys(answer.results).length > 1;
  $("summary").textContent = `${answer.category}: ${what} · top ${answer.k}` +
    (both ? ` · ${answer.shared.length} found by both variants (marked “in both”)` : "") +
    (q.weight != null ? ` · text weight ${q.weight}` : "") + ` · ${answer.took_ms} ms`;
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
      await vegaEmbed(target, plot.spec, { actions: false, renderer: "svg" });
    } catch (err) {
      target.textContent = `cannot draw: ${err.message}`;
    }
  }
  const errors = answer.errors.length ? ` Problems: ${answer.errors.join("; ")}` : "";
  status.textContent = `${answer.plots.length} plots from dvc.yaml.${errors}`;
  body.dataset.rendered = String(answer.plots.length);
}

const METRIC_COLUMNS = ["recall_at_1", "recall_at_5", "recall_at_10", "mrr", "ndcg_at_10"];

function withCI(mode, key) {
  const value = mode[key];
  if (typeof value !== "number") return "–";
  let text = value.toFixed(3);
  // a confidence interval, where the metrics file has one: <key>_ci: [lo, hi] or ci: {<key>: [lo, hi]}
  const ci = mode[`${key}_ci`] || (mode.ci && mode.ci[key]);
  if (Array.isArray(ci) && ci.length === 2) text += ` [${ci[0].toFixed(3)}, ${ci[1].toFixed(3)}]`;
  return text;
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
      const head = el("tr", {}, [el("th", { text: "query mode" }), ...METRIC_COLUMNS.map((c) => el("th", { text: c }))]);
      const rows = Object.entries(v.metrics)
        .filter(([, mode]) => mode && typeof mode === "object" && "recall_at_5" in mode)
        .map(([modeName, mode]) => el("tr", {}, [
          el("td", { text: modeName }), ...METRIC_COLUMNS.map((c) => el("td", { text: withCI(mode, c) })),
        ]));
      body.append(el("table", { class: "metrics" }, [head, ...rows]));
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
