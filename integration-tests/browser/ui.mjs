// Drives the run browser in headless Chromium, as integration-tests/tests/ui.rs
// asks: node ui.mjs <base-url> <completed-id> <failed-id> <in-flight-id> [screenshot-dir]
// Prints one line per check; exits 1 at the first that fails.
import { chromium } from "playwright-core";

const [base, completed, failed, inFlight, shots] = process.argv.slice(2);
const browser = await chromium.launch({
  executablePath: process.env.CHROMIUM || "/usr/bin/chromium",
  args: [
    "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
    "--disable-background-networking", "--disable-component-update", "--disable-sync",
  ],
});
const fail = async (what) => {
  console.log("FAIL " + what);
  await browser.close();
  process.exit(1);
};
const ok = (what) => console.log("ok " + what);

try {
  const page = await browser.newPage({ viewport: { width: 1200, height: 800 } });
  const alerts = [];
  page.on("dialog", async (d) => { alerts.push(d.message()); await d.dismiss(); });
  const errors = [];
  page.on("pageerror", (e) => errors.push(String(e)));

  // The list: a completed and a failed run, with their statuses.
  await page.goto(base + "/");
  await page.waitForSelector(`tr[data-run="${failed}"]`, { timeout: 10000 });
  const status = (id) => page.textContent(`tr[data-run="${id}"] [data-status]`);
  if ((await status(completed)) !== "completed") await fail("the completed run is listed as completed");
  if ((await status(failed)) !== "failed") await fail("the failed run is listed as failed");
  ok("the list shows a completed and a failed run");
  if (shots) await page.screenshot({ path: shots + "/runs.png", fullPage: true });

  // Filtered by status, from the select.
  await page.selectOption("#status", "failed");
  await page.waitForFunction((c) => !document.querySelector(`tr[data-run="${c}"]`), completed, { timeout: 10000 });
  if (!(await page.$(`tr[data-run="${failed}"]`))) await fail("the status filter keeps the failed run");
  ok("the status filter");

  // The failed run: four payment attempts, the stock released, in order.
  await page.goto(base + "/runs/" + failed);
  await page.waitForSelector("#steps");
  const attempts = await page.textContent('tr[data-step="process-payment"] .attempts');
  if (attempts !== "4") await fail("process-payment shows 4 attempts, not " + attempts);
  const stock = await page.textContent('tr[data-step="reserve-stock"] [data-status]');
  if (stock !== "compensated") await fail("reserve-stock shows compensated, not " + stock);
  const rollback = await page.$$eval("#rollback li", (lis) => lis.map((li) => li.dataset.step));
  if (JSON.stringify(rollback) !== JSON.stringify(["reserve-stock"])) await fail("the rollback lists reserve-stock: " + rollback);
  const timeline = await page.$$eval("#events li", (lis) => lis.map((li) => li.textContent));
  const sent = timeline.filter((t) => t.includes("process-payment: attempt") && t.includes("sent")).length;
  if (sent !== 4) await fail("the timeline shows 4 payment attempts sent, not " + sent + ": " + timeline.join(" | "));
  const undoAt = timeline.findIndex((t) => t.includes("reserve-stock: compensating"));
  const failAt = timeline.findIndex((t) => t.includes("process-payment: failed for good"));
  if (!(failAt >= 0 && undoAt > failAt)) await fail("the compensation follows the failure in the timeline");
  ok("the failed run: 4 payment attempts, reserve-stock compensated after the failure");

  // Markup in an error is text: shown as written, never run.
  const error = await page.textContent('tr[data-step="process-payment"] .error');
  if (!error.includes("<script>alert('x')</script>")) await fail("the error text is shown as written: " + error);
  if ((await page.$$("main script")).length !== 0) await fail("no script element comes from the data");
  if (alerts.length !== 0) await fail("no script from the data ran: " + alerts);
  const stray = await page.textContent("main");
  if (stray.includes("null") || stray.includes("undefined")) await fail("no stray null or undefined in the page");
  ok("an error with markup is shown as text");
  if (shots) await page.screenshot({ path: shots + "/run-failed.png", fullPage: true });

  // A run in flight: its page updates without a reload.
  await page.goto(base + "/runs/" + inFlight);
  await page.waitForSelector("#run-status [data-status]");
  const before = await page.textContent("#run-status [data-status]");
  if (before !== "running") await fail("the run in flight shows running, not " + before);
  if (shots) await page.screenshot({ path: shots + "/run-live.png", fullPage: true });
  // The test lets the run finish now, while the page is open.
  console.log("LET-IT-FINISH");
  await page.waitForFunction(
    () => document.querySelector("#run-status [data-status]")?.textContent === "completed",
    null, { timeout: 20000 });
  ok("a run in flight turns completed without a reload");

  if (errors.length) await fail("page errors: " + errors.join("; "));
  await browser.close();
} catch (e) {
  await fail(String(e && e.stack || e));
}
