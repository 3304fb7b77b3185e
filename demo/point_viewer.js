// The demo's 3D view: coloured points and solid camera cones (triangles with edge lines) in plain WebGL, run by gradio's gr.HTML as
// `js_on_load` (given `element`, `props` and `watch`). No library and nothing fetched: the data come inline in
// `props.value` (see `viewer_data` in app.py).
//
// Camera: an orbit around `target` at `distance`, turned by `yaw` (about the y axis) and `pitch`. A new scene (a new
// `value.scene` id) is framed on its robust box; a redraw of the same scene (a filter changed) keeps the camera.
// A click (no drag) on a point picks it: the first pick is A, the second B and their distance is shown (a third
// starts again). The cones are drawn after the points over a cleared depth buffer: points never bury them, and
// they still hide their own back faces. For tests and scripts the root element carries `data-camera` (the camera as
// JSON), `data-points` (the number of points drawn), `data-lines` (cone edge ends drawn), `data-cones` (cone triangle
// corners drawn), `data-scene`, `data-point-size`, and
// `data-picks` (the picked points in the model's frame, JSON) with `data-distance`.
const canvas = element.querySelector("canvas");
const resetButton = element.querySelector("#reset-view");
const sizeInput = element.querySelector("#point-size");
const readout = element.querySelector(".point-readout");
const root = element.querySelector(".point-viewer");
const gl = canvas.getContext("webgl", { antialias: false, preserveDrawingBuffer: true });
if (!gl) {
  element.querySelector(".point-viewer").textContent =
    "This browser offers no WebGL, so the 3D view cannot be drawn: download shown_scene.glb below instead.";
  return;
}
const FOV = Math.PI / 4;
const MAX_PITCH = Math.PI / 2 - 0.01;
let camera = null;
let box = null;
let sceneId = null;
let pointCount = 0;
let lineCount = 0;
let coneCount = 0;
let pointSize = Number(sizeInput.value);
let positions = new Float32Array(0);
let picks = [];
let pending = false;

function shader(type, source) {
  const compiled = gl.createShader(type);
  gl.shaderSource(compiled, source);
  gl.compileShader(compiled);
  return compiled;
}

const program = gl.createProgram();
gl.attachShader(program, shader(gl.VERTEX_SHADER, `
  attribute vec3 position;
  attribute vec3 colour;
  uniform mat4 matrix;
  uniform float size;
  varying vec3 shade;
  void main() {
    gl_Position = matrix * vec4(position, 1.0);
    gl_PointSize = size;
    shade = colour;
  }`));
gl.attachShader(program, shader(gl.FRAGMENT_SHADER, `
  precision mediump float;
  varying vec3 shade;
  void main() { gl_FragColor = vec4(shade, 1.0); }`));
gl.linkProgram(program);
const where = {
  position: gl.getAttribLocation(program, "position"),
  colour: gl.getAttribLocation(program, "colour"),
  matrix: gl.getUniformLocation(program, "matrix"),
  size: gl.getUniformLocation(program, "size"),
};
const buffers = {
  points: gl.createBuffer(), pointColours: gl.createBuffer(), lines: gl.createBuffer(), lineColours: gl.createBuffer(),
  cones: gl.createBuffer(), coneColours: gl.createBuffer(), picks: gl.createBuffer(), pickColours: gl.createBuffer(),
};
const PICK_COLOURS = new Uint8Array([255, 60, 60, 60, 140, 255]);  // A red, B blue

function bytes(text) {
  const raw = atob(text || "");
  const out = new Uint8Array(raw.length);
  for (let i = 0; i < raw.length; i++) out[i] = raw.charCodeAt(i);
  return out;
}

function upload(buffer, data) {
  gl.bindBuffer(gl.ARRAY_BUFFER, buffer);
  gl.bufferData(gl.ARRAY_BUFFER, data, gl.STATIC_DRAW);
}

const sub = (a, b) => [a[0] - b[0], a[1] - b[1], a[2] - b[2]];
const dot = (a, b) => a[0] * b[0] + a[1] * b[1] + a[2] * b[2];
const cross = (a, b) => [a[1] * b[2] - a[2] * b[1], a[2] * b[0] - a[0] * b[2], a[0] * b[1] - a[1] * b[0]];
const unit = (a) => { const n = Math.hypot(a[0], a[1], a[2]) || 1; return [a[0] / n, a[1] / n, a[2] / n]; };

// The eye and its right / up / forward directions.
function basis() {
  const { target, distance, yaw, pitch } = camera;
  const eye = [
    target[0] + distance * Math.cos(pitch) * Math.sin(yaw),
    target[1] + distance * Math.sin(pitch),
    target[2] + distance * Math.cos(pitch) * Math.cos(yaw),
  ];
  const forward = unit(sub(target, eye));
  const right = unit(cross(forward, [0, 1, 0]));
  return { eye, forward, right, up: cross(right, forward) };
}

// Column-major projection * view matrix.
function matrix() {
  const { eye, forward, right, up } = basis();
  const view = [
    right[0], up[0], -forward[0], 0, right[1], up[1], -forward[1], 0, right[2], up[2], -forward[2], 0,
    -dot(right, eye), -dot(up, eye), dot(forward, eye), 1,
  ];
  const near = camera.distance / 200;
  const far = camera.distance * 200;
  const f = 1 / Math.tan(FOV / 2);
  const aspect = canvas.width / Math.max(1, canvas.height);
  const projection = [f / aspect, 0, 0, 0, 0, f, 0, 0, 0, 0, (far + near) / (near - far), -1,
    0, 0, (2 * far * near) / (near - far), 0];
  const out = new Float32Array(16);
  for (let column = 0; column < 4; column++) {
    for (let row = 0; row < 4; row++) {
      let sum = 0;
      for (let k = 0; k < 4; k++) sum += projection[k * 4 + row] * view[column * 4 + k];
      out[column * 4 + row] = sum;
    }
  }
  return out;
}

function attribute(location, buffer, size, type, normalized) {
  gl.bindBuffer(gl.ARRAY_BUFFER, buffer);
  gl.enableVertexAttribArray(location);
  gl.vertexAttribPointer(location, size, type, normalized, 0, 0);
}

function draw() {
  pending = false;
  const ratio = window.devicePixelRatio || 1;
  const width = Math.max(1, Math.round(canvas.clientWidth * ratio));
  const height = Math.max(1, Math.round(canvas.clientHeight * ratio));
  if (canvas.width !== width || canvas.height !== height) {
    canvas.width = width;
    canvas.height = height;
  }
  gl.viewport(0, 0, width, height);
  gl.clearColor(0.12, 0.12, 0.14, 1);
  gl.clear(gl.COLOR_BUFFER_BIT | gl.DEPTH_BUFFER_BIT);
  if (!camera) return;
  gl.enable(gl.DEPTH_TEST);
  gl.useProgram(program);
  gl.uniformMatrix4fv(where.matrix, false, matrix());
  gl.uniform1f(where.size, pointSize * ratio);
  attribute(where.position, buffers.points, 3, gl.FLOAT, false);
  attribute(where.colour, buffers.pointColours, 3, gl.UNSIGNED_BYTE, true);
  gl.drawArrays(gl.POINTS, 0, pointCount);
  if (coneCount > 0) {  // over the points: a fresh depth buffer, so only the cones hide each other
    gl.clear(gl.DEPTH_BUFFER_BIT);
    gl.depthFunc(gl.LEQUAL);
    attribute(where.position, buffers.cones, 3, gl.FLOAT, false);
    attribute(where.colour, buffers.coneColours, 3, gl.UNSIGNED_BYTE, true);
    gl.drawArrays(gl.TRIANGLES, 0, coneCount);
  }
  if (lineCount > 0) {
    attribute(where.position, buffers.lines, 3, gl.FLOAT, false);
    attribute(where.colour, buffers.lineColours, 3, gl.UNSIGNED_BYTE, true);
    gl.drawArrays(gl.LINES, 0, lineCount);
  }
  gl.depthFunc(gl.LESS);
  if (picks.length > 0) {  // on top of everything, larger than the points
    gl.disable(gl.DEPTH_TEST);
    gl.uniform1f(where.size, (pointSize + 8) * ratio);
    attribute(where.position, buffers.picks, 3, gl.FLOAT, false);
    attribute(where.colour, buffers.pickColours, 3, gl.UNSIGNED_BYTE, true);
    gl.drawArrays(gl.POINTS, 0, picks.length);
  }
}

function redraw() {
  if (!pending) {
    pending = true;
    requestAnimationFrame(draw);
  }
}

function publishCamera() {
  if (!camera) {
    delete element.dataset.camera;
    return;
  }
  const round = (value) => Number(value.toPrecision(6));
  element.dataset.camera = JSON.stringify({
    target: camera.target.map(round), distance: round(camera.distance), yaw: round(camera.yaw),
    pitch: round(camera.pitch),
  });
}

// Look at the middle of the robust box from the first camera's side (+z in the viewer's frame), the whole box in view.
function frame() {
  if (!box) return;
  const [low, high] = box;
  const radius = 0.5 * Math.hypot(high[0] - low[0], high[1] - low[1], high[2] - low[2]) || 1;
  camera = {
    target: [0, 1, 2].map((axis) => 0.5 * (low[axis] + high[axis])),
    distance: radius / Math.sin(FOV / 2),
    yaw: 0,
    pitch: 0,
  };
  publishCamera();
  redraw();
}

// The viewer's y-up frame back to the model's (the first camera's OpenCV frame: y down, z forward).
const modelFrame = (point) => [point[0], -point[1], -point[2]];

function setPicks(points) {
  picks = points;
  upload(buffers.picks, new Float32Array(picks.flat()));
  upload(buffers.pickColours, PICK_COLOURS.slice(0, 3 * picks.length));
  element.dataset.picks = JSON.stringify(picks.map(modelFrame));
  if (picks.length === 2) {
    const distance = Math.hypot(...sub(picks[0], picks[1]));
    element.dataset.distance = String(distance);
    readout.textContent = `A to B: ${distance.toPrecision(4)} scene units`;
  } else {
    delete element.dataset.distance;
    readout.textContent = picks.length === 1 ? "A picked: click a second point" : "";
  }
  redraw();
}

// The frontmost point drawn within a few pixels of (x, y) (CSS pixels in the canvas), or -1.
function nearestPoint(x, y) {
  const m = matrix();
  const width = canvas.clientWidth;
  const height = canvas.clientHeight;
  const reach = Math.max(4, pointSize);
  let best = -1;
  let bestDepth = Infinity;
  for (let i = 0; i < pointCount; i++) {
    const px = positions[3 * i];
    const py = positions[3 * i + 1];
    const pz = positions[3 * i + 2];
    const w = m[3] * px + m[7] * py + m[11] * pz + m[15];
    if (w <= 0 || w >= bestDepth) continue;
    const sx = (((m[0] * px + m[4] * py + m[8] * pz + m[12]) / w + 1) * width) / 2;
    const sy = ((1 - (m[1] * px + m[5] * py + m[9] * pz + m[13]) / w) * height) / 2;
    if (Math.abs(sx - x) <= reach && Math.abs(sy - y) <= reach) {
      best = i;
      bestDepth = w;
    }
  }
  return best;
}

function pick(event) {
  const rect = canvas.getBoundingClientRect();
  const index = nearestPoint(event.clientX - rect.left, event.clientY - rect.top);
  if (index < 0) return;
  const point = Array.from(positions.subarray(3 * index, 3 * index + 3));
  setPicks(picks.length < 2 ? [...picks, point] : [point]);
}

function show(value) {
  if (!value) {
    camera = box = sceneId = null;
    pointCount = lineCount = coneCount = 0;
    element.dataset.points = element.dataset.lines = element.dataset.cones = "0";
    delete root.dataset.drawn;
    delete element.dataset.scene;
    publishCamera();
    setPicks([]);
    draw();
    return;
  }
  positions = new Float32Array(bytes(value.positions).buffer);
  upload(buffers.points, positions);
  upload(buffers.pointColours, bytes(value.colours));
  upload(buffers.lines, new Float32Array(bytes(value.lines).buffer));
  upload(buffers.lineColours, bytes(value.line_colours));
  upload(buffers.cones, new Float32Array(bytes(value.cones).buffer));
  upload(buffers.coneColours, bytes(value.cone_colours));
  pointCount = value.count;
  lineCount = bytes(value.line_colours).length / 3;
  coneCount = bytes(value.cone_colours).length / 3;
  root.dataset.drawn = "1";
  box = value.box;
  if (value.scene !== sceneId || !camera) {
    sceneId = value.scene;
    frame();
    setPicks([]);
  }
  draw();
  element.dataset.scene = sceneId;
  element.dataset.points = String(pointCount);
  element.dataset.lines = String(lineCount);
  element.dataset.cones = String(coneCount);
}

// Drag: turn (left button) or pan (shift or right button); wheel: zoom.
let drag = null;
canvas.addEventListener("contextmenu", (event) => event.preventDefault());
canvas.addEventListener("pointerdown", (event) => {
  if (!camera) return;
  drag = { x: event.clientX, y: event.clientY, pan: event.shiftKey || event.button === 2, moved: 0 };
  canvas.setPointerCapture(event.pointerId);
});
canvas.addEventListener("pointermove", (event) => {
  if (!drag) return;
  const dx = event.clientX - drag.x;
  const dy = event.clientY - drag.y;
  drag.x = event.clientX;
  drag.y = event.clientY;
  drag.moved += Math.abs(dx) + Math.abs(dy);
  if (drag.pan) {
    const { right, up } = basis();
    const perPixel = (2 * camera.distance * Math.tan(FOV / 2)) / Math.max(1, canvas.clientHeight);
    camera.target = camera.target.map((value, axis) => value - (right[axis] * dx - up[axis] * dy) * perPixel);
  } else {
    camera.yaw -= dx * 0.008;
    camera.pitch = Math.max(-MAX_PITCH, Math.min(MAX_PITCH, camera.pitch + dy * 0.008));
  }
  publishCamera();
  redraw();
});
canvas.addEventListener("pointerup", (event) => {
  if (drag && drag.moved < 3 && !drag.pan && event.button === 0) pick(event);
  drag = null;
});
canvas.addEventListener("pointercancel", () => { drag = null; });
canvas.addEventListener("wheel", (event) => {
  if (!camera) return;
  event.preventDefault();
  camera.distance *= Math.exp(Math.max(-100, Math.min(100, event.deltaY)) * 0.002);
  publishCamera();
  redraw();
}, { passive: false });
resetButton.addEventListener("click", frame);
sizeInput.addEventListener("input", () => {
  pointSize = Number(sizeInput.value);
  element.dataset.pointSize = String(pointSize);
  redraw();
});
new ResizeObserver(redraw).observe(canvas);

element.dataset.pointSize = String(pointSize);
show(props.value);
watch("value", () => show(props.value));
