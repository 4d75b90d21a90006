// The editor: DALL-E 2's workflow over the server's own Images API, and nothing else.
//
// The picture lives on a "world" canvas three frames wide, the first image in its middle. A frame of
// the stack's output size sits on it: Generate fills candidates; picking one paints it into the frame.
// The brush erases (marks what to repaint); the frame can be dragged partly off the picture. "Edit in
// frame" sends the frame's pixels as a PNG whose transparent pixels are the erased ones and the empty
// ones, which is how OpenAI's edits endpoint takes an inpainting or an outpainting.

const $ = (id) => document.getElementById(id);
const VIEW = 768; // the on-screen canvas, in its own pixels
const state = { size: 256, world: null, mask: null, frame: { x: 0, y: 0 }, picked: false, busy: false, drag: null };

// --- the API --------------------------------------------------------------------------------------
function headers(extra = {}) {
  const key = $("api-key").value.trim();
  return key ? { Authorization: `Bearer ${key}`, ...extra } : extra;
}

async function call(path, body, label) {
  // POST to the API; while it runs, show its place in the queue and its steps
  const id = crypto.randomUUID().replaceAll("-", "");
  const isForm = body instanceof FormData;
  const init = {
    method: "POST",
    headers: headers({ "X-Request-Id": id, ...(isForm ? {} : { "Content-Type": "application/json" }) }),
    body: isForm ? body : JSON.stringify(body),
  };
  setBusy(true, `${label}: sent`);
  const poll = setInterval(() => showProgress(id, label), 250);
  try {
    const response = await fetch(path, init);
    const json = await response.json().catch(() => ({}));
    if (!response.ok) throw new Error(json.error?.message || `${response.status} ${response.statusText}`);
    return json.data;
  } finally {
    clearInterval(poll);
    setBusy(false, "");
  }
}

async function showProgress(id, label) {
  const response = await fetch(`/v1/images/progress/${id}`, { headers: headers() }).catch(() => null);
  if (!response || !response.ok) return;
  const p = await response.json();
  const bar = $("progress");
  if (p.state === "queued") {
    $("status").textContent = `${label}: waiting, ${p.queue_position} in the queue`;
  } else if (p.steps_total) {
    $("status").textContent = `${label}: ${p.stage}, step ${p.steps_done} of ${p.steps_total}`;
    bar.hidden = false;
    bar.value = p.steps_done / p.steps_total;
  }
}

function setBusy(busy, message) {
  state.busy = busy;
  $("status").textContent = message;
  $("progress").hidden = !busy;
  $("progress").value = 0;
  for (const id of ["generate", "edit", "variations", "clear-mask"]) {
    $(id).disabled = busy || (id !== "generate" && !state.picked);
  }
}

function showError(error) {
  $("error").hidden = !error;
  $("error").textContent = error ? String(error.message || error) : "";
}

async function loadModel() {
  const response = await fetch("/v1/models", { headers: headers() });
  const json = await response.json();
  if (!response.ok) throw new Error(json.error?.message || response.statusText);
  const model = json.data[0];
  $("model").textContent = `${model.id}: ${model.sizes.join(", ")}`;
  $("size").replaceChildren(...model.sizes.map((s) => new Option(s, s)));
  $("size").value = model.sizes[model.sizes.length - 1];
  resetWorld(parseInt($("size").value, 10));
}

// --- the picture ----------------------------------------------------------------------------------
function canvas(w, h) {
  const c = document.createElement("canvas");
  c.width = w;
  c.height = h;
  return c;
}

function resetWorld(size) {
  state.size = size;
  state.world = canvas(3 * size, 3 * size);
  state.mask = canvas(3 * size, 3 * size);
  state.frame = { x: size, y: size };
  state.picked = false;
  setBusy(false, "");
  draw();
}

function draw() {
  const view = $("canvas").getContext("2d");
  const scale = VIEW / state.world.width;
  view.clearRect(0, 0, VIEW, VIEW);
  view.imageSmoothingEnabled = false;
  view.drawImage(state.world, 0, 0, VIEW, VIEW);
  view.globalAlpha = 0.45;
  view.drawImage(state.mask, 0, 0, VIEW, VIEW); // the erased region, tinted
  view.globalAlpha = 1;
  const { x, y } = state.frame;
  view.strokeStyle = "#0a66c2";
  view.lineWidth = 3;
  view.setLineDash([10, 6]);
  view.strokeRect(x * scale, y * scale, state.size * scale, state.size * scale);
  view.setLineDash([]);
}

function frameCrop({ transparentErased }) {
  // the frame's pixels; with transparentErased, erased and empty pixels come out transparent
  const { x, y } = state.frame;
  const s = state.size;
  const out = canvas(s, s);
  const ctx = out.getContext("2d");
  ctx.drawImage(state.world, x, y, s, s, 0, 0, s, s);
  if (transparentErased) {
    ctx.globalCompositeOperation = "destination-out";
    ctx.drawImage(state.mask, x, y, s, s, 0, 0, s, s);
    ctx.globalCompositeOperation = "source-over";
  }
  return out;
}

function placeInFrame(image) {
  const { x, y } = state.frame;
  const s = state.size;
  const ctx = state.world.getContext("2d");
  ctx.clearRect(x, y, s, s);
  ctx.drawImage(image, x, y, s, s);
  state.mask.getContext("2d").clearRect(x, y, s, s);
  state.picked = true;
  setBusy(false, "placed in the frame");
  draw();
}

function toBlob(c) {
  return new Promise((resolve) => c.toBlob(resolve, "image/png"));
}

function opaque(c) {
  // over white: what variations take (an image with no transparency)
  const out = canvas(c.width, c.height);
  const ctx = out.getContext("2d");
  ctx.fillStyle = "#fff";
  ctx.fillRect(0, 0, out.width, out.height);
  ctx.drawImage(c, 0, 0);
  return out;
}

// --- results: candidates and history ---------------------------------------------------------------
let made = 0;

function showResults(data, label) {
  const box = $("candidates");
  box.replaceChildren();
  data.forEach((item, i) => {
    const bytes = Uint8Array.from(atob(item.b64_json), (ch) => ch.charCodeAt(0));
    const url = URL.createObjectURL(new Blob([bytes], { type: "image/png" })); // the server's PNG, provenance and all
    const img = new Image();
    img.src = url;
    img.alt = `${label}, candidate ${i + 1}`;
    img.dataset.index = String(i);
    img.addEventListener("click", () => placeInFrame(img));
    box.append(img);
    addToHistory(url, `${label} (seed ${item.seed})`);
  });
}

function addToHistory(url, label) {
  made += 1;
  const li = document.createElement("li");
  const img = new Image();
  img.src = url;
  img.alt = label;
  const a = document.createElement("a");
  a.href = url;
  a.download = `unclip-${String(made).padStart(3, "0")}.png`;
  a.textContent = "download";
  li.append(img, ` ${label} `, a);
  $("history").prepend(li);
}

// --- the actions ------------------------------------------------------------------------------------
function sampling() {
  const seed = $("seed").value;
  return seed === "" ? {} : { seed: parseInt(seed, 10) };
}

async function run(action) {
  showError(null);
  try {
    await action();
  } catch (error) {
    showError(error);
  }
}

async function generate() {
  const prompt = $("prompt").value.trim();
  const n = parseInt($("count").value, 10);
  const body = { prompt, n, size: `${state.size}x${state.size}`, response_format: "b64_json", ...sampling() };
  showResults(await call("/v1/images/generations", body, "generation"), prompt || "generation");
}

async function edit() {
  const form = new FormData();
  form.append("image", await toBlob(frameCrop({ transparentErased: true })), "frame.png");
  form.append("prompt", $("prompt").value.trim());
  form.append("n", $("count").value);
  form.append("size", `${state.size}x${state.size}`);
  form.append("response_format", "b64_json");
  for (const [k, v] of Object.entries(sampling())) form.append(k, String(v));
  showResults(await call("/v1/images/edits", form, "edit"), `edit: ${$("prompt").value.trim()}`);
}

async function variations() {
  const form = new FormData();
  form.append("image", await toBlob(opaque(frameCrop({ transparentErased: false }))), "frame.png");
  form.append("n", $("count").value);
  form.append("size", `${state.size}x${state.size}`);
  form.append("response_format", "b64_json");
  for (const [k, v] of Object.entries(sampling())) form.append(k, String(v));
  showResults(await call("/v1/images/variations", form, "variations"), "variation");
}

// --- the pointer: brush and frame ----------------------------------------------------------------------
function worldPoint(event) {
  const rect = $("canvas").getBoundingClientRect();
  const scale = state.world.width / rect.width;
  return { x: (event.clientX - rect.left) * scale, y: (event.clientY - rect.top) * scale };
}

function tool() {
  return document.querySelector("input[name=tool]:checked").value;
}

function erase(point) {
  const ctx = state.mask.getContext("2d");
  const r = (parseInt($("brush").value, 10) * state.world.width) / VIEW / 2;
  ctx.fillStyle = "#e0218a";
  ctx.beginPath();
  ctx.arc(point.x, point.y, r, 0, 2 * Math.PI);
  ctx.fill();
  draw();
}

function onDown(event) {
  if (!state.picked || state.busy) return;
  $("canvas").setPointerCapture(event.pointerId);
  const p = worldPoint(event);
  state.drag = { start: p, frame: { ...state.frame } };
  if (tool() === "erase") erase(p);
}

function onMove(event) {
  if (!state.drag) return;
  const p = worldPoint(event);
  if (tool() === "erase") {
    erase(p);
    return;
  }
  const max = state.world.width - state.size;
  const clamp = (v) => Math.max(0, Math.min(max, Math.round(v)));
  state.frame = { x: clamp(state.drag.frame.x + p.x - state.drag.start.x), y: clamp(state.drag.frame.y + p.y - state.drag.start.y) };
  draw();
}

function onUp() {
  state.drag = null;
}

// --- wiring -----------------------------------------------------------------------------------------
$("generate").addEventListener("click", () => run(generate));
$("edit").addEventListener("click", () => run(edit));
$("variations").addEventListener("click", () => run(variations));
$("clear-mask").addEventListener("click", () => {
  state.mask.getContext("2d").clearRect(0, 0, state.mask.width, state.mask.height);
  draw();
});
$("size").addEventListener("change", () => resetWorld(parseInt($("size").value, 10)));
$("canvas").addEventListener("pointerdown", onDown);
$("canvas").addEventListener("pointermove", onMove);
$("canvas").addEventListener("pointerup", onUp);
$("api-key").addEventListener("change", () => run(loadModel));
window.unclipEditor = state; // for the tests and the curious
run(loadModel);
