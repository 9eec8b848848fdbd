// Turns k6's end-of-run summary into a short Markdown report for people, plus the same table on
// stdout. Each row is a Trend metric the scenario recorded (time-based, with `count` among the
// summary stats), shown as requests, requests per second over its phase, and latency percentiles.

const ms = (value) => (value === undefined ? '-' : `${value.toFixed(2)} ms`);

function row(data, { metric, label, seconds }) {
  const values = (data.metrics[metric] || {}).values || {};
  const count = values.count || 0;
  return `| ${label} | ${count} | ${(count / seconds).toFixed(1)} | ${ms(values.med)} | ${ms(values['p(95)'])} | ${ms(values['p(99)'])} | ${ms(values.max)} |`;
}

function thresholdLines(data) {
  const lines = [];
  for (const [name, metric] of Object.entries(data.metrics)) {
    for (const [rule, outcome] of Object.entries(metric.thresholds || {})) {
      lines.push(`- ${outcome.ok ? 'pass' : 'FAIL'}: \`${name}\` ${rule}`);
    }
  }
  return lines.sort();
}

/// `{ stdout, <reportDir>/<name>.md, <reportDir>/<name>.json }` for k6's handleSummary.
export function summaryFiles(data, { name, title, description, rows }) {
  const failed = (data.metrics.http_req_failed || {}).values || {};
  const lines = [
    `# ${title}`,
    '',
    description,
    '',
    `Run at ${new Date().toISOString()}; failed requests: ${((failed.rate || 0) * 100).toFixed(2)}% of ${(data.metrics.http_reqs || { values: { count: 0 } }).values.count}.`,
    '',
    '| what | requests | per second | p50 | p95 | p99 | max |',
    '|---|---|---|---|---|---|---|',
    ...rows.map((spec) => row(data, spec)),
    '',
    '## Thresholds',
    '',
    ...thresholdLines(data),
    '',
  ];
  const text = lines.join('\n');
  const reportDir = __ENV.REPORT_DIR || '.';
  // The whole summary too, for tools that read the figures (`cargo xtask bench tasks`).
  return { stdout: `\n${text}\n`, [`${reportDir}/${name}.md`]: text, [`${reportDir}/${name}.json`]: JSON.stringify(data) };
}
