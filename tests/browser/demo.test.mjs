// The demo page in a real browser against the real server: headless Chromium (the
// Debian package, /usr/bin/chromium) driven by playwright-core, the debug binary
// serving the default bundle on a loopback port. Run by scripts/browser-test.sh, or
// `node --test demo.test.mjs` here after `npm ci`. Screenshots go to target/browser/.

import { after, before, test } from "node:test";
import assert from "node:assert/strict";
import { spawn } from "node:child_process";
import { existsSync } from "node:fs";
import { mkdir, mkdtemp, readFile, rm } from "node:fs/promises";
import { tmpdir } from "node:os";
import path from "node:path";
import { fileURLToPath } from "node:url";
import { chromium } from "playwright-core";

const root = path.resolve(path.dirname(fileURLToPath(import.meta.url)), "../..");
const BINARY = process.env.LADIC_SERVE_BIN || path.join(root, "target/debug/ladic-serve");
const CHROMIUM = process.env.CHROMIUM || "/usr/bin/chromium";
const ARTIFACTS = path.join(root, "target/browser");
const CHROMIUM_ARGS = [
  "--headless",
  "--no-sandbox",
  "--disable-gpu",
  "--disable-quic",
  "--no-first-run",
  "--disable-background-networking",
  "--disable-component-update",
  "--disable-sync",
];

const fixtures = JSON.parse(
  await readFile(path.join(root, "tests/fixtures/images/scenes.json"), "utf8"),
);
const SCENE = fixtures.images[0];
const SCENE_PNG = path.join(root, "tests/fixtures/images", SCENE.file);
// What the default bundle should say about SCENE: its canonical Scenes caption.
const EXPECTED_CAPTION = SCENE.canonical_caption;

let server; // { process, base, log }
let context;
let userDataDir;

/** Starts the binary on a free loopback port; resolves with its address once it logs it. */
function startServer() {
  const env = { ...process.env };
  const ort = path.join(root, ".ort/lib/libonnxruntime.so");
  if (!env.ORT_DYLIB_PATH && existsSync(ort)) env.ORT_DYLIB_PATH = ort;
  const child = spawn(
    BINARY,
    [
      "--log-json",
      "serve",
      "--bind", "127.0.0.1:0",
      "--bundle", path.join(root, "models/scenes-tiny"),
      "--device", "cpu",
      "--intra-op-threads", "1",
    ],
    { env, stdio: ["ignore", "ignore", "pipe"] },
  );
  const log = [];
  return new Promise((resolve, reject) => {
    let pending = "";
    child.stderr.setEncoding("utf8");
    child.stderr.on("data", (chunk) => {
      pending += chunk;
      let nl;
      while ((nl = pending.indexOf("\n")) >= 0) {
        const line = pending.slice(0, nl);
        pending = pending.slice(nl + 1);
        log.push(line);
        let entry = null;
        try { entry = JSON.parse(line); } catch { continue; }
        const fields = entry.fields || {};
        if (fields.message === "listening" && fields.addr) {
          resolve({ process: child, base: `http://${fields.addr}`, log });
        }
      }
    });
    child.on("error", reject);
    child.on("exit", (code) => reject(new Error(
      `ladic-serve exited with ${code} before listening:\n${log.slice(-20).join("\n")}`)));
  });
}

async function waitReady(base, seconds) {
  const deadline = Date.now() + seconds * 1000;
  for (;;) {
    try {
      const r = await fetch(`${base}/health/ready`);
      if (r.ok) return;
    } catch { /* not listening yet */ }
    if (Date.now() > deadline) throw new Error(`not ready after ${seconds} s:\n${server.log.slice(-20).join("\n")}`);
    await new Promise((r) => setTimeout(r, 200));
  }
}

before(async () => {
  assert.ok(existsSync(BINARY), `${BINARY} is missing: run cargo build first`);
  assert.ok(existsSync(CHROMIUM), `${CHROMIUM} is missing: apt-get install chromium`);
  await mkdir(ARTIFACTS, { recursive: true });
  server = await startServer();
  await waitReady(server.base, 180);
  userDataDir = await mkdtemp(path.join(tmpdir(), "ladic-chromium-"));
  // A persistent context on a fresh directory: Playwright refuses --user-data-dir in args.
  context = await chromium.launchPersistentContext(userDataDir, {
    executablePath: CHROMIUM,
    headless: true,
    args: CHROMIUM_ARGS,
    viewport: { width: 1280, height: 900 },
  });
});

after(async () => {
  await context?.close();
  if (userDataDir) await rm(userDataDir, { recursive: true, force: true });
  if (server) {
    const exited = new Promise((r) => server.process.once("exit", r));
    server.process.kill("SIGTERM");
    const timer = setTimeout(() => server.process.kill("SIGKILL"), 10_000);
    await exited;
    clearTimeout(timer);
  }
});

/** A page on the demo, recording every request and script error. */
async function openDemo(viewport, colorScheme = "light") {
  const page = await context.newPage();
  await page.setViewportSize(viewport);
  await page.emulateMedia({ colorScheme });
  const requests = [];
  const errors = [];
  page.on("request", (r) => requests.push(r.url()));
  page.on("pageerror", (e) => errors.push(String(e)));
  page.on("console", (m) => { if (m.type() === "error") errors.push(m.text()); });
  await page.goto(`${server.base}/`);
  await page.waitForFunction(() => !document.getElementById("model").textContent.includes("loading"));
  return { page, requests, errors };
}

/** Sets the form, presses Caption, and waits for the final caption or an error. */
async function caption(page, { file, steps, seed, candidates, backRefine }) {
  await page.setInputFiles("#image", file);
  if (steps !== undefined) await page.fill("#steps", String(steps));
  if (seed !== undefined) await page.fill("#seed", String(seed));
  if (candidates !== undefined) await page.fill("#candidates", String(candidates));
  if (backRefine !== undefined) await page.setChecked("#back_refine", backRefine);
  await page.getByRole("button", { name: "Caption" }).click();
  await page.waitForFunction(
    () => ["done", "error"].includes(document.getElementById("app").dataset.state),
    null,
    { timeout: 120_000 },
  );
  return page.locator("#app").getAttribute("data-state");
}

function assertLocalOnly(requests, errors) {
  const base = server.base;
  const foreign = requests.filter((u) => !u.startsWith(`${base}/`) && !u.startsWith("blob:") && !u.startsWith("data:"));
  assert.deepEqual(foreign, [], "the page loads nothing from elsewhere");
  assert.deepEqual(errors, [], "no script errors");
}

test("captions a Scenes image and shows the steps", { timeout: 180_000 }, async () => {
  const { page, requests, errors } = await openDemo({ width: 1280, height: 900 });
  // Keyboard: the first Tab lands on the image picker (the drop zone's file input).
  await page.keyboard.press("Tab");
  assert.equal(await page.evaluate(() => document.activeElement.id), "image");

  const state = await caption(page, { file: SCENE_PNG, steps: 10, seed: 1 });
  assert.equal(state, "done", await page.locator("#error").textContent());
  assert.equal(await page.locator("#preview").isVisible(), true);
  const text = (await page.locator("#caption-text").textContent()).trim();
  // The default bundle gives this image's canonical caption here, but the server's own
  // tests hold the model to its captions (allowing for other CPUs' rounding); this one
  // checks the page, so only the caption's shape.
  assert.ok(text.length > 1, `caption: ${JSON.stringify(text)}`);
  assert.ok(text.endsWith("."), `caption: ${JSON.stringify(text)}`);
  console.log(`caption: ${JSON.stringify(text)} (canonical: ${JSON.stringify(EXPECTED_CAPTION)})`);

  const shown = Number(await page.locator("#counter").getAttribute("data-steps-shown"));
  assert.ok(shown >= 2, `intermediate steps shown: ${shown}`);
  const tokens = await page.locator("#cand-0 .tok").allTextContents();
  assert.ok(tokens.length > 1 && !(tokens.at(-1) === "." && tokens.at(-2) === "."),
    `the padding after the caption is one ".": ${JSON.stringify(tokens)}`);
  assert.ok(await page.locator("#trail li").count() >= 2);
  assert.equal(await page.locator("#cands li").count(), 1);
  assert.match(await page.locator("#timings").textContent(), /inference\s*[\d.]+ ms/);
  await page.screenshot({ path: path.join(ARTIFACTS, "demo.png"), fullPage: true });
  assertLocalOnly(requests, errors);
  await page.close();
});

test("phone-sized, dark: MBR candidates and Back&Refine", { timeout: 180_000 }, async () => {
  const { page, requests, errors } = await openDemo({ width: 390, height: 844 }, "dark");
  const background = await page.evaluate(() => getComputedStyle(document.body).backgroundColor);
  assert.equal(background, "rgb(15, 18, 22)", "the dark palette applies");
  const state = await caption(page, {
    file: path.join(root, "tests/fixtures/images", fixtures.images[1].file),
    steps: 10, seed: 2, candidates: 3, backRefine: true,
  });
  assert.equal(state, "done", await page.locator("#error").textContent());
  assert.equal(await page.locator("#cands li").count(), 3);
  assert.equal(await page.locator("#cands li.chosen").count(), 1);
  assert.ok(await page.locator("#trail li.refine").count() >= 1, "the Back&Refine restart is marked");
  assert.ok(Number(await page.locator("#counter").getAttribute("data-steps-shown")) >= 2);
  const overflow = await page.evaluate(() => document.documentElement.scrollWidth - window.innerWidth);
  assert.ok(overflow <= 0, `no sideways scrolling on a phone (${overflow} px too wide)`);
  await page.screenshot({ path: path.join(ARTIFACTS, "demo-phone.png"), fullPage: true });
  assertLocalOnly(requests, errors);
  await page.close();
});

test("shows API errors in the API's words", { timeout: 60_000 }, async () => {
  const { page } = await openDemo({ width: 1280, height: 900 });
  const state = await caption(page, {
    file: { name: "notes.txt", mimeType: "text/plain", buffer: Buffer.from("not an image") },
    steps: 2,
  });
  assert.equal(state, "error");
  const error = page.locator("#error");
  assert.equal(await error.getAttribute("data-error-type"), "invalid_image");
  const shown = await error.textContent();
  assert.match(shown, /^invalid_image \(HTTP 400\): /);
  // The message is the API's own.
  const form = new FormData();
  form.append("image", new Blob(["not an image"]), "notes.txt");
  const body = await (await fetch(`${server.base}/caption`, { method: "POST", body: form })).json();
  assert.ok(shown.endsWith(body.error), `${shown} vs ${body.error}`);
  await page.screenshot({ path: path.join(ARTIFACTS, "demo-error.png") });
  await page.close();
});
