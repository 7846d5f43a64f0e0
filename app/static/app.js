// Demo page for the robust classification service. Plain ES2020, no build step, no dependencies.
// Talks to the JSON API of the same origin: GET /models, GET /health/ready, POST /classify, POST /attack.
"use strict";

const $ = (sel) => document.querySelector(sel);

const state = {
  images: [], // [{file: File, url: objectURL, name, trueLabel}]
  models: [], // manifests summarised by GET /models
  busy: false,
};

// ---- helpers --------------------------------------------------------------------------------

class ApiError extends Error {
  constructor(status, code, message) {
    super(message);
    this.status = status;
    this.code = code;
  }
}

/** fetch + JSON; throws ApiError carrying the server's {"error": {"code", "message"}} when not ok. */
async function api(path, options = {}) {
  let response;
  try {
    response = await fetch(path, { headers: { Accept: "application/json" }, ...options });
  } catch (err) {
    throw new ApiError(0, "network_error", `Cannot reach the server (${err.message}).`);
  }
  const text = await response.text();
  let body = null;
  try {
    body = text ? JSON.parse(text) : null;
  } catch (_) {
    body = null;
  }
  if (!response.ok) {
    const err = body && body.error ? body.error : null;
    const detail = body && body.detail ? JSON.stringify(body.detail) : text.slice(0, 200);
    throw new ApiError(response.status, err ? err.code : `http_${response.status}`,
      err ? err.message : detail || response.statusText);
  }
  return body;
}

/** Build an element: el("div", {class: "x", text: "hi"}, child, ...). */
function el(tag, attrs = {}, ...children) {
  const node = document.createElement(tag);
  for (const [key, value] of Object.entries(attrs)) {
    if (value === undefined || value === null || value === false) continue;
    if (key === "text") node.textContent = value;
    else if (key === "class") node.className = value;
    else if (key === "style") node.style.cssText = value;
    else node.setAttribute(key, value === true ? "" : value);
  }
  for (const child of children) if (child) node.append(child);
  return node;
}

const pct = (share) => `${(100 * share).toFixed(share >= 0.995 || share === 0 ? 0 : 1)} %`;
const png = (b64) => (b64.startsWith("data:") ? b64 : `data:image/png;base64,${b64}`);
const ms = (value) => (value === undefined || value === null ? "" : `${Number(value).toFixed(0)} ms`);

function showError(err) {
  const box = $("#error");
  $("#error-title").textContent = err.code ? `Error (${err.code}${err.status ? `, HTTP ${err.status}` : ""}):` : "Error:";
  $("#error-message").textContent = ` ${err.message}`;
  box.hidden = false;
}

function clearError() {
  $("#error").hidden = true;
}

function setBusy(busy, button, label) {
  state.busy = busy;
  for (const b of [$("#classify-button"), $("#attack-button")]) b.disabled = busy || state.images.length === 0;
  if (button) {
    if (busy) {
      button.dataset.label = button.textContent;
      button.textContent = label;
      button.setAttribute("aria-busy", "true");
    } else {
      button.textContent = button.dataset.label || button.textContent;
      button.removeAttribute("aria-busy");
    }
  }
}

// ---- models, health, samples ----------------------------------------------------------------

function modelKind(model) {
  const method = model.training_method || (model.training && model.training.method) || "";
  if (method) return method;
  return /supervised/i.test(model.name) ? "supervised" : "";
}

function modelLabel(model) {
  const kind = modelKind(model);
  return kind && kind !== model.name ? `${model.name} (${kind})` : model.name;
}

async function loadModels() {
  const body = await api("/models");
  const list = Array.isArray(body) ? body : body.models || [];
  state.models = list;
  const defaultName = (!Array.isArray(body) && body.default_model) || (list.find((m) => m.default) || list[0] || {}).name;

  for (const select of [$("#classify-model"), $("#attack-model")]) {
    select.replaceChildren(...list.map((m) => el("option", { value: m.name, text: modelLabel(m), selected: m.name === defaultName })));
  }
  renderCompareChoices();
  renderTargets();
  if (list.length === 0) showError(new ApiError(0, "no_models", "The server has no model loaded."));
}

function selectedModel(selectId) {
  return state.models.find((m) => m.name === $(selectId).value) || state.models[0];
}

function renderCompareChoices() {
  const attacked = $("#attack-model").value;
  const others = state.models.filter((m) => m.name !== attacked);
  const box = $("#compare-models");
  if (others.length === 0) {
    box.replaceChildren(el("span", { class: "muted", text: "no other model loaded" }));
    return;
  }
  box.replaceChildren(...others.map((m) => {
    const id = `compare-${m.name}`;
    return el("div", { class: "check" },
      el("input", { type: "checkbox", id, name: "compare", value: m.name, checked: true }),
      el("label", { for: id, text: modelLabel(m) }));
  }));
}

function renderTargets() {
  const model = selectedModel("#attack-model");
  const classes = (model && model.classes) || [];
  $("#target").replaceChildren(
    el("option", { value: "", text: "none (untargeted)" }),
    ...classes.map((name, i) => el("option", { value: String(i), text: name })),
  );
}

async function loadHealth() {
  try {
    const body = await api("/health/ready");
    const parts = [];
    const models = body.models || {};
    const entries = Array.isArray(models) ? models : Object.entries(models).map(([name, m]) => ({ name, ...m }));
    for (const m of entries) {
      const bits = [m.device, m.runtime, m.index || m.index_backend].filter(Boolean).join(", ");
      parts.push(bits ? `${m.name}: ${bits}` : m.name);
    }
    const skipped = Object.keys(body.skipped || {});
    $("#server-status").textContent = `Server ready: ${entries.length} model(s) loaded`
      + (skipped.length ? `; refused at start-up: ${skipped.join(", ")}.` : ".");
    $("#server-status").className = "server-status ok";
    $("#footer-info").textContent = parts.length ? `Models: ${parts.join(" · ")}` : "";
  } catch (err) {
    $("#server-status").textContent = `Server not ready: ${err.message}`;
    $("#server-status").className = "server-status bad";
  }
}

async function loadSamples() {
  const box = $("#samples");
  try {
    const index = await api("/static/samples/index.json");
    box.replaceChildren(...index.samples.map((s) => {
      const button = el("button", {
        type: "button", class: "sample", "data-file": s.file, "aria-pressed": "false",
        title: `${s.label} (CIFAR-10 test image #${s.test_index})`,
        "aria-label": `Sample: ${s.label}, CIFAR-10 test image ${s.test_index}`,
      }, el("img", { src: `/static/samples/${s.file}`, alt: "", width: 48, height: 48 }),
      el("span", { text: s.label }));
      button.addEventListener("click", () => pickSample(s, button));
      return button;
    }));
  } catch (err) {
    box.replaceChildren(el("p", { class: "muted", text: `Samples unavailable (${err.message}).` }));
  }
}

// ---- image selection ------------------------------------------------------------------------

function setImages(images) {
  for (const img of state.images) URL.revokeObjectURL(img.url);
  state.images = images;
  const strip = $("#preview");
  if (images.length === 0) {
    strip.replaceChildren(el("p", { class: "muted", text: "No image selected." }));
    $("#preview-caption").textContent = "";
  } else {
    strip.replaceChildren(...images.map((img) => el("img", { src: img.url, alt: `Selected image ${img.name}`, class: "pixelated" })));
    const first = images[0];
    $("#preview-caption").textContent = images.length === 1
      ? `${first.name}${first.trueLabel ? ` - true label: ${first.trueLabel}` : ""}`
      : `${images.length} images; the attack uses the first (${first.name}).`;
  }
  $("#classify-results").replaceChildren();
  $("#attack-results").replaceChildren();
  setBusy(state.busy);
}

async function pickSample(sample, button) {
  clearError();
  try {
    const response = await fetch(`/static/samples/${sample.file}`);
    if (!response.ok) throw new ApiError(response.status, "sample_missing", `Cannot load sample ${sample.file}.`);
    const blob = await response.blob();
    const file = new File([blob], sample.file, { type: blob.type || "image/png" });
    for (const b of document.querySelectorAll(".sample")) b.setAttribute("aria-pressed", String(b === button));
    $("#file-input").value = "";
    setImages([{ file, url: URL.createObjectURL(file), name: sample.file, trueLabel: sample.label }]);
  } catch (err) {
    showError(err);
  }
}

function onFileInput(event) {
  clearError();
  const files = Array.from(event.target.files || []);
  for (const b of document.querySelectorAll(".sample")) b.setAttribute("aria-pressed", "false");
  setImages(files.map((file) => ({ file, url: URL.createObjectURL(file), name: file.name, trueLabel: null })));
}

// ---- rendering ------------------------------------------------------------------------------

function votesList(votes, winner) {
  return el("ol", { class: "votes" }, ...(votes || []).map((v) => el("li", { class: v.label === winner ? "winner" : "" },
    el("span", { class: "vote-label", text: v.label }),
    el("span", { class: "bar", "aria-hidden": "true" }, el("span", { style: `width: ${(100 * v.share).toFixed(1)}%` })),
    el("span", { class: "vote-share", text: pct(v.share) }))));
}

// conformal credibility (calibrated models only) and whether the service declined to answer
function trustLine(r) {
  if (r.credibility === null || r.credibility === undefined) return null;
  return el("p", { class: `meta trust${r.abstained ? " abstained" : ""}`, "data-abstained": String(r.abstained),
    text: `${r.abstained ? "abstained · " : ""}credibility ${pct(r.credibility)} · confidence ${pct(r.confidence)}` });
}

function renderClassify(body) {
  const header = el("p", { class: "meta", text: `Model ${body.model} · ${body.results.length} image(s) · ${ms(body.latency_ms)}` });
  const cards = body.results.map((r, i) => {
    const img = state.images[i];
    const truth = img && img.trueLabel;
    const verdict = truth ? (truth === r.label ? "correct" : "wrong") : null;
    return el("article", { class: "result", "data-label": r.label },
      img ? el("img", { src: img.url, alt: `Input ${r.filename}`, class: "thumb pixelated" }) : null,
      el("div", {},
        el("h3", {}, el("span", { class: "prediction", text: r.label }),
          verdict ? el("span", { class: `badge ${verdict === "correct" ? "good" : "bad"}`, text: verdict === "correct" ? "correct" : `true: ${truth}` }) : null),
        el("p", { class: "meta", text: `${r.filename} · ${r.width}×${r.height} px · class ${r.class_id}` }),
        trustLine(r),
        votesList(r.votes, r.label)));
  });
  $("#classify-results").replaceChildren(header, ...cards);
}

function prediction(title, pred) {
  if (!pred) return null;
  return el("div", { class: "pred" },
    el("span", { class: "pred-title", text: title }),
    el("strong", { text: pred.label }),
    pred.votes && pred.votes.length ? el("span", { class: "muted", text: ` (${pct(pred.votes[0].share)} of votes)` }) : null);
}

function outcomeBadge(success) {
  return success
    ? el("span", { class: "badge bad", text: "fooled" })
    : el("span", { class: "badge good", text: "held" });
}

/** One column: a model attacked directly (the main result or a compare[].attack). */
function attackColumn(modelName, result, cleanUrl, role) {
  const eps255 = (result.linf * 255).toFixed(1);
  return el("article", { class: "attack-col", "data-model": modelName },
    el("h3", {}, el("span", { text: modelName }), outcomeBadge(result.success)),
    el("p", { class: "meta", text: role }),
    el("div", { class: "triptych" },
      el("figure", {}, el("img", { src: cleanUrl, alt: `Clean input for ${modelName}`, class: "pixelated" }), el("figcaption", { text: "clean" })),
      el("figure", {}, el("img", { src: png(result.adversarial_png), alt: `Adversarial image against ${modelName}`, class: "pixelated adv" }), el("figcaption", { text: "adversarial" })),
      el("figure", {}, el("img", { src: png(result.perturbation_png), alt: `Amplified perturbation against ${modelName}`, class: "pixelated pert" }), el("figcaption", { text: "perturbation (amplified)" }))),
    prediction("clean:", result.clean),
    prediction("adversarial:", result.adversarial),
    votesList(result.adversarial && result.adversarial.votes, result.adversarial && result.adversarial.label),
    el("p", { class: "meta", text: `L∞ ${eps255}/255 · L2 ${Number(result.l2).toFixed(3)}` }));
}

function renderAttack(body, cleanUrl) {
  const cols = [attackColumn(body.model, body, cleanUrl, `attacked directly (${body.method}, ε ${(body.eps * 255).toFixed(0)}/255, ${body.steps} steps)`)];
  const transfers = [];
  for (const c of body.compare || []) {
    if (c.attack) cols.push(attackColumn(c.model, c.attack, cleanUrl, `attacked in turn (${body.method})`));
    if (c.transfer) transfers.push(c);
  }
  const target = body.target ? `, targeted at ${body.target.label}` : ", untargeted";
  const out = [
    el("p", { class: "meta", text: `${body.method} against ${body.model}${target} · ${ms(body.latency_ms)}` }),
    el("div", { class: "attack-grid" }, ...cols),
  ];
  if (transfers.length) {
    out.push(el("h3", { text: `Transfer: the perturbation crafted on ${body.model}, shown to the other models` }),
      el("table", { class: "transfer" },
        el("thead", {}, el("tr", {}, ...["model", "clean", "adversarial", "outcome"].map((h) => el("th", { scope: "col", text: h })))),
        el("tbody", {}, ...transfers.map((c) => el("tr", { "data-model": c.model },
          el("th", { scope: "row", text: c.model }),
          el("td", { text: c.transfer.clean ? c.transfer.clean.label : "" }),
          el("td", { text: c.transfer.adversarial ? c.transfer.adversarial.label : "" }),
          el("td", {}, outcomeBadge(c.transfer.success)))))));
  }
  $("#attack-results").replaceChildren(...out);
}

// ---- actions --------------------------------------------------------------------------------

async function onClassify(event) {
  event.preventDefault();
  clearError();
  if (state.images.length === 0) return showError(new ApiError(0, "no_image", "Choose or upload an image first."));
  const form = new FormData();
  for (const img of state.images) form.append("files", img.file, img.name);
  form.append("model", $("#classify-model").value);
  form.append("top_k", $("#top-k").value || "3");
  if ($("#min-credibility").value !== "") form.append("min_credibility", $("#min-credibility").value);
  setBusy(true, $("#classify-button"), "Classifying…");
  $("#classify-results").setAttribute("aria-busy", "true");
  try {
    renderClassify(await api("/classify", { method: "POST", body: form }));
  } catch (err) {
    showError(err);
  } finally {
    $("#classify-results").removeAttribute("aria-busy");
    setBusy(false, $("#classify-button"));
  }
}

async function onAttack(event) {
  event.preventDefault();
  clearError();
  if (state.images.length === 0) return showError(new ApiError(0, "no_image", "Choose or upload an image first."));
  const img = state.images[0];
  const compare = Array.from(document.querySelectorAll("#compare-models input:checked")).map((c) => c.value);
  const form = new FormData();
  form.append("file", img.file, img.name);
  form.append("model", $("#attack-model").value);
  form.append("method", $("#method").value);
  form.append("eps", String(Number($("#eps").value) / 255));
  form.append("steps", $("#steps").value || "10");
  form.append("top_k", $("#top-k").value || "3");
  if ($("#target").value !== "") form.append("target", $("#target").value);
  if (compare.length) form.append("compare", compare.join(","));
  setBusy(true, $("#attack-button"), "Attacking…");
  $("#attack-results").setAttribute("aria-busy", "true");
  try {
    renderAttack(await api("/attack", { method: "POST", body: form }), img.url);
  } catch (err) {
    showError(err);
  } finally {
    $("#attack-results").removeAttribute("aria-busy");
    setBusy(false, $("#attack-button"));
  }
}

// ---- start ----------------------------------------------------------------------------------

document.addEventListener("DOMContentLoaded", () => {
  $("#file-input").addEventListener("change", onFileInput);
  $("#classify-form").addEventListener("submit", onClassify);
  $("#attack-form").addEventListener("submit", onAttack);
  $("#attack-model").addEventListener("change", () => { renderCompareChoices(); renderTargets(); });
  $("#eps").addEventListener("input", () => { $("#eps-value").textContent = $("#eps").value; });
  $("#method").addEventListener("change", () => { $("#steps").disabled = $("#method").value === "fgsm"; });
  $("#error-close").addEventListener("click", clearError);
  loadSamples();
  loadHealth();
  loadModels().catch(showError);
});
