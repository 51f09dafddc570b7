// The likeness web page: submit a thumbnail to POST /upscale, poll GET /jobs/{id}, show the result.
"use strict";

const $ = (id) => document.getElementById(id);
const FINAL = new Set(["succeeded", "failed", "canceled"]);
const POLL_MS = 500;
const VIEW_PX = 256;
let currentJob = null;
let thumbFile = null;

function headers() {
  // Only with a key: a server without API keys must not see a stray Authorization header.
  const key = $("api-key").value.trim();
  return key ? { Authorization: `Bearer ${key}` } : {};
}

function showError(code, message) {
  const box = $("error");
  box.innerHTML = "";
  const c = document.createElement("code");
  c.textContent = code;
  box.append(c, document.createTextNode(`: ${message}`));
  box.hidden = false;
}

function clearError() { $("error").hidden = true; }

// API errors are JSON {code, message}; anything else (a proxy page, a network failure) gets a code of ours.
async function apiError(resp) {
  try {
    const body = await resp.json();
    if (body && body.code) return [body.code, body.message || ""];
  } catch (_) { /* not JSON */ }
  return [`http_${resp.status}`, resp.statusText || "request failed"];
}

async function api(path, init = {}) {
  let resp;
  try {
    resp = await fetch(path, { ...init, headers: { ...headers(), ...(init.headers || {}) } });
  } catch (err) {
    throw { code: "network_error", message: String(err) };
  }
  if (!resp.ok) {
    const [code, message] = await apiError(resp);
    throw { code, message };
  }
  return resp;
}

async function loadLabels() {
  try {
    const labels = await (await api("/labels")).json();
    const race = $("race");
    for (const name of labels.races) race.add(new Option(name, name));
    const box = $("attributes");
    for (const name of labels.attributes) {
      const label = document.createElement("label");
      const select = document.createElement("select");
      select.dataset.attribute = name;
      for (const [text, value] of [["any", ""], ["yes", "1"], ["no", "0"]]) select.add(new Option(text, value));
      label.append(document.createTextNode(name.replaceAll("_", " ")), select);
      box.append(label);
    }
  } catch (err) {
    showError(err.code, `could not load the label names: ${err.message}`);
  }
}

function setThumbnail(file) {
  thumbFile = file;
  const img = $("thumb-preview");
  img.src = URL.createObjectURL(file);
  img.hidden = false;
}

function wireDrop() {
  const drop = $("drop");
  $("thumbnail").addEventListener("change", (e) => { if (e.target.files[0]) setThumbnail(e.target.files[0]); });
  drop.addEventListener("dragover", (e) => { e.preventDefault(); drop.classList.add("over"); });
  drop.addEventListener("dragleave", () => drop.classList.remove("over"));
  drop.addEventListener("drop", (e) => {
    e.preventDefault();
    drop.classList.remove("over");
    const file = e.dataTransfer.files[0];
    if (file) setThumbnail(file);
  });
}

function buildForm() {
  const form = new FormData();
  form.append("thumbnail", thumbFile, thumbFile.name || "thumbnail.png");
  const ref = $("reference").files[0];
  if (ref) form.append("reference", ref, ref.name);
  if ($("race").value) form.append("race", $("race").value);
  for (const select of document.querySelectorAll("#attributes select")) {
    if (select.value) form.append("attribute", `${select.dataset.attribute}=${select.value}`);
  }
  for (const id of ["steps", "restarts", "views", "seed"]) {
    if ($(id).value !== "") form.append(id, $(id).value);
  }
  return form;
}

function showProgress(job) {
  $("progress-box").hidden = false;
  const p = job.progress || {};
  $("progress").max = Math.max(1, p.steps || 1);
  $("progress").value = p.step || 0;
  const mse = p.best_mse == null ? "–" : p.best_mse.toPrecision(4);
  const queue = job.status === "queued" && job.queue_position ? ` (position ${job.queue_position})` : "";
  $("progress-text").textContent = `${job.status}${queue} · step ${p.step || 0}/${p.steps || 0} · best MSE ${mse}`;
}

// A canvas with high-quality smoothing gives the browser's bicubic-class upscale as the baseline.
function bicubic(src, size) {
  return new Promise((resolve) => {
    const img = new Image();
    img.onload = () => {
      const canvas = document.createElement("canvas");
      canvas.width = canvas.height = size;
      const ctx = canvas.getContext("2d");
      ctx.imageSmoothingEnabled = true;
      ctx.imageSmoothingQuality = "high";
      ctx.drawImage(img, 0, 0, size, size);
      resolve(canvas.toDataURL("image/png"));
    };
    img.src = src;
  });
}

function showReport(report) {
  const body = $("report").tBodies[0];
  body.innerHTML = "";
  for (const [key, value] of Object.entries(report || {})) {
    const row = body.insertRow();
    const th = document.createElement("th");
    th.textContent = key;
    row.append(th);
    row.insertCell().textContent = typeof value === "object" ? JSON.stringify(value) : String(value);
  }
}

async function showResult(job) {
  const resp = await api(job.links ? job.links.result : `/jobs/${job.id}/result`);
  const url = URL.createObjectURL(await resp.blob());
  const thumbUrl = URL.createObjectURL(thumbFile);
  $("res-thumb").src = thumbUrl;
  $("res-bicubic").src = await bicubic(thumbUrl, VIEW_PX);
  $("res-result").src = url;
  $("download").href = url;
  $("download").download = `likeness-${job.id}.png`;
  showReport(job.result);
  $("results").hidden = false;
}

function finish() {
  currentJob = null;
  $("submit").disabled = false;
  $("cancel").hidden = true;
}

async function poll(id) {
  while (currentJob === id) {
    let job;
    try {
      job = await (await api(`/jobs/${id}`)).json();
    } catch (err) {
      showError(err.code, err.message);
      return finish();
    }
    showProgress(job);
    if (FINAL.has(job.status)) {
      if (job.status === "succeeded") {
        try { await showResult(job); } catch (err) { showError(err.code, err.message); }
      } else if (job.status === "failed") {
        const e = job.error || {};
        showError(e.code || "failed", e.message || "the job failed");
      } else {
        showError("canceled", "the job was canceled");
      }
      return finish();
    }
    await new Promise((r) => setTimeout(r, POLL_MS));
  }
}

async function submit(event) {
  event.preventDefault();
  clearError();
  if (!thumbFile) return showError("no_thumbnail", "choose or drop a thumbnail first");
  $("results").hidden = true;
  $("submit").disabled = true;
  try {
    const job = await (await api("/upscale", { method: "POST", body: buildForm() })).json();
    currentJob = job.id;
    $("cancel").hidden = false;
    showProgress({ status: job.status, progress: {} });
    poll(job.id);
  } catch (err) {
    showError(err.code, err.message);
    finish();
  }
}

async function cancel() {
  if (!currentJob) return;
  try {
    await api(`/jobs/${currentJob}/cancel`, { method: "POST" });
  } catch (err) {
    showError(err.code, err.message);
  }
}

$("form").addEventListener("submit", submit);
$("cancel").addEventListener("click", cancel);
// With API keys, /labels answers 401 until a key is typed: load the names again then.
$("api-key").addEventListener("change", () => {
  if ($("race").options.length <= 1) { clearError(); loadLabels(); }
});
wireDrop();
loadLabels();
