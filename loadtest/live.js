// Live updates through the edge (ws://127.0.0.1:8080/v1/live by default): every virtual user holds
// one WebSocket for the whole run while a writer renames the users' tasks at a constant rate.
// Reported: how long a change takes from its event time (the frame's `at`) to a socket, and how
// many frames arrived. Run with `cargo xtask load live`; `cargo xtask bench live` goes further
// (10,000 sockets, fan-out) with a Rust client.
//
// k6 speaks HTTP/1.1 to a cleartext edge, which is what a WebSocket upgrade needs anyway.

import http from 'k6/http';
import { check } from 'k6';
import exec from 'k6/execution';
import { Counter, Trend } from 'k6/metrics';
import { setTimeout } from 'k6/timers';
import { WebSocket } from 'k6/experimental/websockets';
import { summaryFiles } from './lib/report.js';

const BASE = __ENV.BASE_URL || 'http://127.0.0.1:8080';
const LIVE_URL = `${BASE.replace(/^http/, 'ws')}/v1/live`;
const SMOKE = __ENV.SMOKE === '1';
const SECONDS = SMOKE ? 5 : 60; // how long every socket stays open
const SOCKETS = SMOKE ? 10 : 200;
// A user's devices: at most 10 sockets per user (the service's default limit per instance).
const USERS = SMOKE ? 2 : 20;
const WRITE_RATE = SMOKE ? 5 : 100; // renames per second, over all users' tasks
// Writes start once the sockets are open and stop early enough for the last frames to arrive.
const WRITES_FROM = 1;
const WRITES_FOR = SECONDS - 2;

const frameLatency = new Trend('live_frame_latency', true);
const frames = new Counter('live_frames');
const outOfOrder = new Counter('live_frames_out_of_order');
const socketsReady = new Counter('live_sockets_ready');
const abnormalCloses = new Counter('live_sockets_closed_abnormally');
const rename = new Trend('rename', true);

export const options = {
  setupTimeout: '120s',
  scenarios: {
    sockets: {
      executor: 'per-vu-iterations',
      vus: SOCKETS,
      iterations: 1,
      maxDuration: `${SECONDS + 30}s`,
      exec: 'holdSocket',
    },
    writer: {
      executor: 'constant-arrival-rate',
      rate: WRITE_RATE,
      timeUnit: '1s',
      duration: `${WRITES_FOR}s`,
      startTime: `${WRITES_FROM}s`,
      preAllocatedVUs: SMOKE ? 2 : 20,
      maxVUs: SMOKE ? 10 : 100,
      exec: 'renameTask',
    },
  },
  summaryTrendStats: ['count', 'avg', 'med', 'p(95)', 'p(99)', 'max'],
  thresholds: {
    live_frame_latency: ['p(99)<250'],
    live_sockets_closed_abnormally: ['count==0'],
    live_frames_out_of_order: ['count==0'],
    live_sockets_ready: [`count==${SOCKETS}`],
    'http_req_failed{scenario:writer}': ['rate<0.01'],
    checks: ['rate>0.99'],
  },
};

const JSON_BODY = { 'content-type': 'application/json' };

export async function setup() {
  const run = Date.now().toString(36);
  const users = [];
  for (let i = 0; i < USERS; i++) {
    const account = JSON.stringify({ username: `live_${run}_${i}`, password: `live-password-${run}-${i}` });
    check(http.post(`${BASE}/v1/auth/signup`, account, { headers: JSON_BODY }), { 'signup 201': (r) => r.status === 201 });
    const login = http.post(`${BASE}/v1/auth/login`, account, { headers: JSON_BODY });
    check(login, { 'login 200': (r) => r.status === 200 });
    const token = login.json('access_token');
    const task = http.post(`${BASE}/v1/tasks`, JSON.stringify({ title: `live ${i}` }), {
      headers: Object.assign({ authorization: `Bearer ${token}` }, JSON_BODY),
    });
    check(task, { 'create 201': (r) => r.status === 201 });
    users.push({ token, task: task.json('id') });
  }
  await warmUp(users[0]);
  return { users };
}

/// Right after `up`, the first changes take seconds (the consumer is still joining its group):
/// renames one task until its frame arrives within 250 ms, so the run measures a warm system.
function warmUp(user) {
  return new Promise((resolve, reject) => {
    const ws = new WebSocket(LIVE_URL, null, {
      headers: { 'Sec-WebSocket-Protocol': `taskstream.v1, bearer.${user.token}` },
    });
    const started = Date.now();
    let n = 0;
    const renameOnce = () => {
      n += 1;
      const renamed = http.patch(`${BASE}/v1/tasks/${user.task}`, JSON.stringify({ title: `live warm-up ${n}` }), {
        headers: Object.assign({ authorization: `Bearer ${user.token}`, 'if-match': '*' }, JSON_BODY),
      });
      if (renamed.status !== 200) {
        ws.close();
        reject(new Error(`warm-up rename: ${renamed.status} ${renamed.body}`));
      }
    };
    ws.onmessage = (event) => {
      const frame = JSON.parse(event.data);
      if (frame.type === 'ready') return renameOnce();
      if (Date.now() - epochMs(frame.at) < 250) {
        ws.close();
        return resolve();
      }
      if (Date.now() - started > 60000) {
        ws.close();
        return reject(new Error('frames still take over 250 ms after a minute of warm-up'));
      }
      setTimeout(renameOnce, 200);
    };
    ws.onerror = (event) => reject(new Error(`warm-up socket: ${event.error}`));
  });
}

/// Milliseconds since the epoch of an RFC 3339 time, keeping the sub-millisecond digits.
function epochMs(text) {
  const parts = /^(.*T\d\d:\d\d:\d\d)(\.\d+)?(Z|[+-]\d\d:\d\d)$/.exec(text || '');
  if (!parts) return NaN;
  return Date.parse(parts[1] + parts[3]) + (parts[2] ? Number(`0${parts[2]}`) * 1000 : 0);
}

export function holdSocket(data) {
  const user = data.users[(exec.vu.idInTest - 1) % data.users.length];
  // The token goes in the subprotocol list, never in the URL.
  const ws = new WebSocket(LIVE_URL, null, {
    headers: { 'Sec-WebSocket-Protocol': `taskstream.v1, bearer.${user.token}` },
  });
  let closing = false;
  let ready = false;
  let lastSeq = 0;
  outOfOrder.add(0);
  abnormalCloses.add(0);
  ws.onopen = () => {
    setTimeout(() => {
      closing = true;
      ws.close();
    }, SECONDS * 1000);
  };
  ws.onmessage = (event) => {
    const received = Date.now();
    const frame = JSON.parse(event.data);
    if (frame.type === 'ready') {
      ready = true;
      lastSeq = frame.seq;
      socketsReady.add(1);
      return;
    }
    if (typeof frame.seq !== 'number') return; // e.g. `refreshed`: not a change
    if (!ready || frame.seq !== lastSeq + 1) {
      outOfOrder.add(1);
      console.error(`socket ${exec.vu.idInTest}: seq ${frame.seq} after ${lastSeq}`);
    }
    lastSeq = frame.seq;
    frames.add(1);
    frameLatency.add(Math.max(0, received - epochMs(frame.at)));
  };
  ws.onerror = (event) => {
    if (closing) return;
    closing = true;
    abnormalCloses.add(1);
    console.error(`socket ${exec.vu.idInTest}: ${event.error}`);
  };
  ws.onclose = () => {
    if (!closing) {
      closing = true;
      abnormalCloses.add(1);
      console.error(`socket ${exec.vu.idInTest} closed by the server`);
    }
  };
}

export function renameTask(data) {
  const n = exec.scenario.iterationInTest;
  const user = data.users[n % data.users.length];
  // `If-Match: *`: writer VUs share no state, so none knows the task's current version.
  const renamed = http.patch(`${BASE}/v1/tasks/${user.task}`, JSON.stringify({ title: `live rename ${n}` }), {
    headers: Object.assign({ authorization: `Bearer ${user.token}`, 'if-match': '*' }, JSON_BODY),
    tags: { name: 'PATCH /v1/tasks/{id}' },
  });
  rename.add(renamed.timings.duration);
  check(renamed, { 'rename 200': (r) => r.status === 200 });
}

export function handleSummary(data) {
  const count = (name) => ((data.metrics[name] || {}).values || {}).count || 0;
  return summaryFiles(data, {
    name: 'live',
    title: 'live: change frames over WebSockets',
    description:
      `${SOCKETS} sockets through the edge (${USERS} users, ${SOCKETS / USERS} each) held for ${SECONDS} s while ` +
      `${WRITE_RATE} renames/s (for ${WRITES_FOR} s) change the users' tasks; each rename reaches every socket ` +
      `of its user. Frame latency is receive time minus the frame's \`at\` (the change's event time). ` +
      `${count('live_sockets_ready')} sockets got \`ready\`, ${count('live_frames')} frames arrived, ` +
      `${count('live_frames_out_of_order')} out of order, ${count('live_sockets_closed_abnormally')} sockets closed abnormally.`,
    rows: [
      { metric: 'live_frame_latency', label: 'frames (event → socket)', seconds: WRITES_FOR },
      { metric: 'rename', label: 'PATCH /v1/tasks/{id}', seconds: WRITES_FOR },
    ],
  });
}
