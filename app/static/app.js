// The likeness web page: submit a thumbnail to POST /upscale, poll GET /jobs/{id}, show the result.
// A photo (larger than a thumbnail) is sent to POST /faces first: its faces are drawn with a
// checkbox each, and the checked ones are upscaled (mode=photo, faces=indices).
"use strict";

const $ = (id) => document.getElementById(id);
const FINAL = new Set(["succeeded", "failed", "canceled"]);
const POLL_MS = 500;
const VIEW_PX = 256;
let currentJob = null;
let thumbFile = null;
let photoFaces = null; // POST /faces' answer while a photo is chosen, else null
const THUMBNAIL_MAX_SIDE = 64; // the server's default LIKENESS_THUMBNAIL_MAX_SIDE

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
  photoFaces = null;
  $("photo-box").hidden = true;
  const img = $("thumb-preview");
  img.src = URL.createObjectURL(file);
  img.onload = () => {
    if (Math.max(img.naturalWidth, img.naturalHeight) > THUMBNAIL_MAX_SIDE) findFaces(file, img);
  };
  img.hidden = false;
}

// A photo: ask the server for its faces, draw them numbered, and offer a checkbox each.
async function findFaces(file, img) {
  clearError();
  $("photo-box").hidden = false;
  $("photo-info").textContent = "looking for faces…";
  $("face-picks").innerHTML = "";
  const form = new FormData();
  form.append("photo", file, file.name || "photo.png");
  let found;
  try {
    found = await (await api("/faces", { method: "POST", body: form })).json();
  } catch (err) {
    $("photo-info").textContent = "";
    return showError(err.code, err.message);
  }
  if (thumbFile !== file) return; // another file was chosen meanwhile
  photoFaces = found;
  const usable = found.faces.filter((f) => f.usable).length;
  const large = found.faces.filter((f) => f.usable && f.large).length;
  // Large faces (over half the generator's side) are not ticked: upscaling them would not
  // add detail, but the server upscales a ticked one all the same.
  const largeNote = large ? `; ${large} already large, left as they are unless ticked` : "";
  $("photo-info").textContent = `${found.width}×${found.height} photo: ${found.faces.length} face(s) found, ` +
    `${usable} usable${largeNote} (faces of at least ${Math.round(found.min_face_size)} px are found; at most ` +
    `${found.max_faces} per request). Tick the faces to upscale:`;
  const canvas = $("photo-canvas");
  const scale = Math.min(1, 720 / found.width);
  canvas.width = Math.round(found.width * scale);
  canvas.height = Math.round(found.height * scale);
  const ctx = canvas.getContext("2d");
  ctx.drawImage(img, 0, 0, canvas.width, canvas.height);
  ctx.lineWidth = 2;
  ctx.font = "bold 14px system-ui, sans-serif";
  let ticked = 0;
  for (const face of found.faces) {
    const [x1, y1, x2, y2] = face.box.map((v) => v * scale);
    ctx.strokeStyle = ctx.fillStyle = !face.usable ? "#c00" : face.large ? "#e80" : "#0c0";
    ctx.strokeRect(x1, y1, x2 - x1, y2 - y1);
    ctx.fillText(String(face.index), x1 + 2, Math.max(14, y1 - 3));
    const label = document.createElement("label");
    const box = document.createElement("input");
    box.type = "checkbox";
    box.dataset.face = String(face.index);
    box.checked = face.chosen && ticked < found.max_faces;
    if (box.checked) ticked += 1;
    box.disabled = !face.usable;
    if (!face.usable) label.className = "unusable";
    else if (face.large) label.className = "large";
    label.title = face.reason || `searched as a ${face.thumbnail_size}px thumbnail`;
    const note = face.usable && face.large ? ", already large" : "";
    label.append(box, document.createTextNode(` face ${face.index} (${Math.round(face.face_side)} px${note})`));
    $("face-picks").append(label);
  }
}

function chosenFaces() {
  return [...document.querySelectorAll("#face-picks input:checked")].map((box) => box.dataset.face);
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
  const race = $("race").value;
  if (race === ":any") form.append("keep_race", "false");
  else if (race) form.append("race", race);
  for (const select of document.querySelectorAll("#attributes select")) {
    if (select.value) form.append("attribute", `${select.dataset.attribute}=${select.value}`);
  }
  for (const id of ["steps", "restarts", "views", "seed"]) {
    if ($(id).value !== "") form.append(id, $(id).value);
  }
  if (photoFaces) {
    form.append("mode", "photo");
    form.append("faces", chosenFaces().join(","));
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

async function showPhotoResult(job) {
  const report = job.result || {};
  const url = URL.createObjectURL(await (await api(job.links.result)).blob());
  $("res-photo").src = URL.createObjectURL(thumbFile);
  $("res-composite").src = url;
  $("download-photo").href = url;
  $("download-photo").download = `likeness-${job.id}.png`;
  const faces = $("res-faces");
  faces.innerHTML = "";
  const body = $("photo-report").tBodies[0];
  body.innerHTML = "";
  for (const face of (report.faces || []).filter((f) => f.chosen)) {
    for (const kind of ["thumbnail", "upscaled"]) {
      const blob = await (await api(`/jobs/${job.id}/faces/${face.index}?kind=${kind}`)).blob();
      const fig = document.createElement("figure");
      const img = document.createElement("img");
      img.src = URL.createObjectURL(blob);
      img.alt = `face ${face.index} ${kind}`;
      if (kind === "thumbnail") img.className = "pixelated";
      const cap = document.createElement("figcaption");
      cap.textContent = `face ${face.index}: ${kind}`;
      fig.append(img, cap);
      faces.append(fig);
    }
    const r = face.result || {};
    const row = body.insertRow();
    const targets = Object.keys(r).filter((k) => k.startsWith("race") || k.startsWith("attributes") || k.startsWith("identity"));
    for (const value of [face.index, face.box.map(Math.round).join(", "), `${face.thumbnail_size}px`,
      String(r.accepted), r.downscale_mse == null ? "–" : r.downscale_mse.toPrecision(4),
      targets.map((k) => `${k}: ${JSON.stringify(r[k])}`).join("; ") || "–"]) {
      row.insertCell().textContent = String(value);
    }
  }
  $("photo-results").hidden = false;
}

async function showResult(job) {
  if (job.result && job.result.mode === "photo") return showPhotoResult(job);
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
  if (photoFaces && chosenFaces().length === 0) return showError("no_faces_chosen", "tick at least one face to upscale");
  $("results").hidden = true;
  $("photo-results").hidden = true;
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
  if ($("race").options.length <= 2) { clearError(); loadLabels(); }
});
wireDrop();
loadLabels();
