// The CRUD journey through the edge (http://127.0.0.1:8080 by default): each iteration creates a
// task, changes it (If-Match), reads it back with its consistency token, and deletes it.
// Reported: requests per second and latency percentiles per step and for the whole journey.
// Run with `cargo xtask load tasks`.
//
// k6 speaks HTTP/1.1 to a cleartext edge (it does HTTP/2 only over TLS); h2load covers h2c.

import http from 'k6/http';
import { check } from 'k6';
import { Trend } from 'k6/metrics';
import { summaryFiles } from './lib/report.js';

const BASE = __ENV.BASE_URL || 'http://127.0.0.1:8080';
const SMOKE = __ENV.SMOKE === '1';
const ACCOUNTS = SMOKE ? 2 : 20;
const SECONDS = SMOKE ? 5 : 60;
const CLIENTS = SMOKE ? 2 : 32;

const steps = {
  create: new Trend('step_create', true),
  update: new Trend('step_update', true),
  get: new Trend('step_get', true),
  delete: new Trend('step_delete', true),
};
const journey = new Trend('journey', true);

export const options = {
  setupTimeout: '120s',
  scenarios: {
    crud: { executor: 'constant-vus', vus: CLIENTS, duration: `${SECONDS}s` },
  },
  summaryTrendStats: ['count', 'avg', 'med', 'p(95)', 'p(99)', 'max'],
  thresholds: {
    http_req_failed: ['rate<0.01'],
    checks: ['rate>0.99'],
    step_create: ['p(99)<250'],
    step_update: ['p(99)<250'],
    step_get: ['p(99)<250'],
    step_delete: ['p(99)<250'],
  },
};

const JSON_BODY = { 'content-type': 'application/json' };

export function setup() {
  const run = Date.now().toString(36);
  const tokens = [];
  for (let i = 0; i < ACCOUNTS; i++) {
    const account = JSON.stringify({ username: `crud_${run}_${i}`, password: `crud-password-${run}-${i}` });
    check(http.post(`${BASE}/v1/auth/signup`, account, { headers: JSON_BODY }), { 'signup 201': (r) => r.status === 201 });
    const login = http.post(`${BASE}/v1/auth/login`, account, { headers: JSON_BODY });
    check(login, { 'login 200': (r) => r.status === 200 });
    tokens.push(login.json('access_token'));
  }
  return { tokens };
}

export default function (data) {
  const auth = { authorization: `Bearer ${data.tokens[(__VU - 1) % data.tokens.length]}` };
  const started = Date.now();

  const created = http.post(
    `${BASE}/v1/tasks`,
    JSON.stringify({ title: `journey ${__VU}-${__ITER}`, labels: ['load', `vu${__VU % 10}`], priority: 'high' }),
    { headers: Object.assign({}, auth, JSON_BODY), tags: { name: 'POST /v1/tasks' } },
  );
  steps.create.add(created.timings.duration);
  if (!check(created, { 'create 201': (r) => r.status === 201 })) { console.error(`create ${created.status} ${created.body}`); return; }
  const path = `${BASE}/v1/tasks/${created.json('id')}`;

  const updated = http.patch(path, JSON.stringify({ status: 'done', title: `journey ${__VU}-${__ITER} done` }), {
    headers: Object.assign({ 'if-match': created.headers['Etag'] }, auth, JSON_BODY),
    tags: { name: 'PATCH /v1/tasks/{id}' },
  });
  steps.update.add(updated.timings.duration);
  if (!check(updated, { 'update 200': (r) => r.status === 200 })) return;

  const read = http.get(path, {
    headers: Object.assign({ 'x-consistency-token': updated.headers['X-Consistency-Token'] }, auth),
    tags: { name: 'GET /v1/tasks/{id}' },
  });
  steps.get.add(read.timings.duration);
  check(read, { 'get sees the update': (r) => r.status === 200 && r.json('status') === 'done' });

  const deleted = http.del(path, null, {
    headers: Object.assign({ 'if-match': updated.headers['Etag'] }, auth),
    tags: { name: 'DELETE /v1/tasks/{id}' },
  });
  steps.delete.add(deleted.timings.duration);
  check(deleted, { 'delete 204': (r) => r.status === 204 });
  journey.add(Date.now() - started);
}

export function handleSummary(data) {
  return summaryFiles(data, {
    name: 'tasks',
    title: 'tasks: the CRUD journey',
    description: `${CLIENTS} clients for ${SECONDS} s, each repeating create → update (If-Match) → get (with the consistency token) → delete, through the edge.`,
    rows: [
      { metric: 'step_create', label: 'POST /v1/tasks', seconds: SECONDS },
      { metric: 'step_update', label: 'PATCH /v1/tasks/{id}', seconds: SECONDS },
      { metric: 'step_get', label: 'GET /v1/tasks/{id}', seconds: SECONDS },
      { metric: 'step_delete', label: 'DELETE /v1/tasks/{id}', seconds: SECONDS },
      { metric: 'http_req_duration', label: 'all requests', seconds: SECONDS },
      { metric: 'journey', label: 'whole journey (4 requests)', seconds: SECONDS },
    ],
  });
}
