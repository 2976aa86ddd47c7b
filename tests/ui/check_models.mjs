// The MLflow UI, in a real browser: each run's Models column shows its logged model, the model's
// page opens from it, and the compare view shows the runs side by side. Run by tests/test_ui.py
// (and by hand for the README's screenshots):
//
//   node tests/ui/check_models.mjs URL EXPERIMENT_ID RUN_IDS MODEL_IDS OUT_DIR
//
// RUN_IDS and MODEL_IDS: comma-separated, what the tracking store says (the test asks its REST
// API). Prints one JSON object of what the page showed; exits 1 when a check fails, with why.
// Chromium is Debian's (/usr/bin/chromium, or CHROMIUM); playwright-core downloads no browser.
import { chromium } from 'playwright-core';

const [url, experimentId, runArg, modelArg, outDir] = process.argv.slice(2);
if (!outDir) {
  console.error('usage: node check_models.mjs URL EXPERIMENT_ID RUN_IDS MODEL_IDS OUT_DIR');
  process.exit(2);
}
const runIds = runArg.split(',');
const modelIds = modelArg.split(',');
const failures = [];
const check = (ok, why) => { if (!ok) failures.push(why); };

const browser = await chromium.launch({
  executablePath: process.env.CHROMIUM || '/usr/bin/chromium',
  // no background traffic: this machine's closed network refuses it, many times a second
  args: ['--headless', '--no-sandbox', '--disable-gpu', '--disable-quic', '--no-first-run',
         '--disable-background-networking', '--disable-component-update', '--disable-sync'],
});
const result = {};
try {
  const page = await browser.newPage({ viewport: { width: 1500, height: 560 } });
  page.setDefaultTimeout(60_000);

  // 1. The runs table of the experiment, with its Models column.
  await page.goto(`${url}/#/experiments/${experimentId}/runs`);
  await page.getByText('Models', { exact: true }).first().waitFor();
  const assistant = page.getByRole('button', { name: 'Close' });  // MLflow's chat panel: room
  if (await assistant.count()) await assistant.first().click();
  await page.locator('a[href*="/models/m-"]').first().waitFor();
  const links = await page.locator('a[href*="/models/m-"]').evaluateAll(
    (as) => as.map((a) => ({ text: a.textContent.trim(), href: a.getAttribute('href') })));
  result.model_links = links;
  for (const id of modelIds) {
    check(links.some((l) => l.href.endsWith(`/models/${id}`) && l.text === 'model'),
          `no link 'model' to logged model ${id} in the runs table's Models column`);
  }
  await page.screenshot({ path: `${outDir}/runs-table.png` });

  // 2. The model's page, where the first run's Models cell leads.
  const href = links.find((l) => l.href.endsWith(`/models/${modelIds[0]}`));
  await page.goto(`${url}/${href ? href.href : `#/experiments/${experimentId}/models/${modelIds[0]}`}`);
  await page.getByText('Source run ID').first().waitFor();
  const modelPage = await page.locator('body').innerText();
  result.model_page_run = runIds.find((id) => modelPage.includes(id)) || null;
  check(result.model_page_run !== null, `the page of model ${modelIds[0]} names none of the runs`);
  check(modelPage.includes('train.lr'), `the page of model ${modelIds[0]} shows no params of its run`);
  await page.screenshot({ path: `${outDir}/model.png` });

  // 3. The compare view of the runs.
  const runs = encodeURIComponent(JSON.stringify(runIds));
  const exps = encodeURIComponent(JSON.stringify([experimentId]));
  await page.goto(`${url}/#/compare-runs?runs=${runs}&experiments=${exps}`);
  await page.getByText('train.lr').first().waitFor();
  const compare = await page.locator('body').innerText();
  result.compare_has = ['train.lr', 'model.cell', 'best_val_ppl', 'test_ppl'].filter((w) => compare.includes(w));
  check(result.compare_has.includes('train.lr') && result.compare_has.includes('best_val_ppl'),
        `the compare view lacks params or metrics: has only ${result.compare_has}`);
  await page.setViewportSize({ width: 1500, height: 900 });
  await page.screenshot({ path: `${outDir}/compare.png` });
} catch (err) {
  failures.push(`${err.name}: ${err.message.split('\n')[0]}`);
} finally {
  await browser.close();
}
result.failures = failures;
console.log(JSON.stringify(result));
process.exit(failures.length ? 1 : 0);
