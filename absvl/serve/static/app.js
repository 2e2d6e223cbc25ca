// absvl web page: text search (GET /search) and VQA with attention overlays (POST /vqa). No build step.
"use strict";

const $ = (id) => document.getElementById(id);
let limits = null;

function showError(element, message) {
  element.textContent = message;
  element.hidden = !message;
}

// The service answers 4xx/5xx with {"detail": "...", "field": "..."}; anything else gets a generic line.
async function errorMessage(response) {
  try {
    const body = await response.json();
    if (typeof body.detail === "string") return `${body.detail} (HTTP ${response.status})`;
  } catch (_) { /* not JSON */ }
  return `The server answered HTTP ${response.status} ${response.statusText}`.trim();
}

async function loadHealth() {
  try {
    const response = await fetch("/health");
    const health = await response.json();
    limits = health.limits;
    // Only the halves the service can do are shown; the others are listed with the reason.
    const served = [];
    if (health.search) {
      const gpu = health.index_device === "cuda" ? " (on the GPU)" : "";
      served.push(`search: model ${health.retrieval_model}, ${health.index_size} indexed images${gpu}`);
    }
    if (health.vqa) served.push(`questions: model ${health.model}`);
    $("status").textContent = served.join(" · ") || "Nothing is served.";
    $("search-section").hidden = !health.search;
    $("vqa-section").hidden = !health.vqa;
    $("unavailable").replaceChildren(...Object.values(health.unavailable).map((reason) => {
      const item = document.createElement("li");
      item.textContent = reason;
      return item;
    }));
    $("unavailable").hidden = !$("unavailable").childElementCount;
    $("search-k").max = limits.max_k;
    $("search-rerank").max = limits.max_rerank;
    $("vqa-top-k").max = limits.max_top_k;
    $("search-query").maxLength = limits.max_query_chars;
    $("vqa-question").maxLength = limits.max_question_chars;
  } catch (err) {
    $("status").textContent = "The service is not reachable.";
  }
}

function score(value) {
  return value === null || value === undefined ? "" : value.toFixed(3);
}

async function search(event) {
  event.preventDefault();
  const form = event.target;
  const button = form.querySelector("button");
  const list = $("search-results");
  showError($("search-error"), "");
  const params = new URLSearchParams({ q: $("search-query").value, k: $("search-k").value, rerank: $("search-rerank").value });
  button.disabled = true;
  try {
    const response = await fetch(`/search?${params}`);
    if (!response.ok) {
      list.replaceChildren();
      $("search-summary").textContent = "";
      showError($("search-error"), await errorMessage(response));
      return;
    }
    const body = await response.json();
    list.replaceChildren(...body.results.map((hit) => {
      const item = document.createElement("li");
      const figure = document.createElement("figure");
      const img = document.createElement("img");
      img.src = hit.url;
      img.loading = "lazy";
      img.alt = `Result ${hit.rank}: image ${hit.id}, score ${score(hit.score)}`;
      const caption = document.createElement("figcaption");
      caption.textContent = `#${hit.rank} · image ${hit.id} · score ${score(hit.score)}` +
        (hit.rerank_score === null ? "" : ` · re-rank ${score(hit.rerank_score)}`);
      figure.append(img, caption);
      item.append(figure);
      return item;
    }));
    $("search-summary").textContent = `${body.results.length} results for “${body.query}”` +
      (body.rerank ? `, top ${body.rerank} re-ranked top-down` : "");
  } catch (err) {
    showError($("search-error"), `Request failed: ${err.message}`);
  } finally {
    button.disabled = false;
  }
}

async function ask(event) {
  event.preventDefault();
  const form = event.target;
  const button = form.querySelector("button");
  const file = $("vqa-image").files[0];
  showError($("vqa-error"), "");
  if (!file) {
    showError($("vqa-error"), "image: choose an image file to upload");
    return;
  }
  if (limits && file.size > limits.max_upload_bytes) {
    const mb = (limits.max_upload_bytes / 1048576).toFixed(1);
    showError($("vqa-error"), `image: the file is larger than the limit of ${mb} MB`);
    return;
  }
  const data = new FormData();
  data.append("image", file);
  data.append("question", $("vqa-question").value);
  data.append("top_k", $("vqa-top-k").value);
  button.disabled = true;
  try {
    const response = await fetch("/vqa", { method: "POST", body: data });
    if (!response.ok) {
      $("vqa-result").hidden = true;
      showError($("vqa-error"), await errorMessage(response));
      return;
    }
    const body = await response.json();
    $("vqa-answers").replaceChildren(...body.answers.map((a) => {
      const item = document.createElement("li");
      const scoreSpan = document.createElement("span");
      scoreSpan.className = "score";
      scoreSpan.textContent = ` (${score(a.score)})`;
      item.append(a.answer, scoreSpan);
      return item;
    }));
    const previous = $("vqa-input").src;
    if (previous.startsWith("blob:")) URL.revokeObjectURL(previous);
    $("vqa-input").src = URL.createObjectURL(file);
    $("vqa-bottom-up").src = body.bottom_up.overlay;
    $("vqa-top-down").src = body.top_down.overlay;
    $("vqa-top-down").alt = `Top-down attention overlay for the question “${body.question}”`;
    $("vqa-result").hidden = false;
  } catch (err) {
    showError($("vqa-error"), `Request failed: ${err.message}`);
  } finally {
    button.disabled = false;
  }
}

document.addEventListener("DOMContentLoaded", () => {
  $("search-form").addEventListener("submit", search);
  $("vqa-form").addEventListener("submit", ask);
  loadHealth();
});
