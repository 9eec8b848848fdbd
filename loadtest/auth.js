// auth under a login storm, through the edge (http://127.0.0.1:8080 by default).
//
// Phase 1: GET /v1/users/me alone at a constant rate. Phase 2: the same reads while virtual users
// log in back to back, saturating the password-hashing workers. Reported: login throughput and
// latency, and profile-read latency percentiles in both phases, so the effect of the storm on
// everything else is visible. Run with `cargo xtask load auth`.
//
// k6 speaks HTTP/1.1 to a cleartext edge (it does HTTP/2 only over TLS); h2load covers h2c.

import http from 'k6/http';
import { check } from 'k6';
import execution from 'k6/execution';
import { Trend } from 'k6/metrics';
import { summaryFiles } from './lib/report.js';

const BASE = __ENV.BASE_URL || 'http://127.0.0.1:8080';
const SMOKE = __ENV.SMOKE === '1';
const ACCOUNTS = SMOKE ? 3 : 20;
const PHASE_SECONDS = SMOKE ? 3 : 30;
const READ_RATE = SMOKE ? 10 : 300; // profile reads per second, in both phases
const LOGIN_USERS = SMOKE ? 2 : 48; // concurrent clients logging in without pause

const profileAlone = new Trend('profile_read_alone', true);
const profileDuringStorm = new Trend('profile_read_during_storm', true);
const login = new Trend('login', true);

const reads = (startTime) => ({
  executor: 'constant-arrival-rate',
  rate: READ_RATE,
  timeUnit: '1s',
  duration: `${PHASE_SECONDS}s`,
  startTime,
  preAllocatedVUs: 20,
  maxVUs: 200,
  exec: 'readProfile',
});

export const options = {
  setupTimeout: '120s',
  scenarios: {
    profile_alone: reads('0s'),
    login_storm: {
      executor: 'constant-vus',
      vus: LOGIN_USERS,
      duration: `${PHASE_SECONDS}s`,
      startTime: `${PHASE_SECONDS}s`,
      exec: 'logIn',
    },
    profile_during_storm: reads(`${PHASE_SECONDS}s`),
  },
  summaryTrendStats: ['count', 'avg', 'med', 'p(95)', 'p(99)', 'max'],
  thresholds: {
    http_req_failed: ['rate<0.01'],
    checks: ['rate>0.99'],
    profile_read_alone: ['p(99)<50'],
    // The storm may slow reads, never stall them: hashing runs on low-priority workers.
    profile_read_during_storm: ['p(99)<250'],
    'http_reqs{name:POST /v1/auth/login}': ['count>0'],
  },
};

const json = { headers: { 'content-type': 'application/json' } };

export function setup() {
  const run = Date.now().toString(36);
  const accounts = [];
  for (let i = 0; i < ACCOUNTS; i++) {
    const account = { username: `load_${run}_${i}`, password: `load-password-${run}-${i}` };
    const signup = http.post(`${BASE}/v1/auth/signup`, JSON.stringify(account), json);
    check(signup, { 'signup 201': (r) => r.status === 201 });
    const tokens = http.post(`${BASE}/v1/auth/login`, JSON.stringify(account), json);
    check(tokens, { 'setup login 200': (r) => r.status === 200 });
    account.accessToken = tokens.json('access_token');
    accounts.push(account);
  }
  return { accounts };
}

const pick = (accounts) => accounts[Math.floor(Math.random() * accounts.length)];

export function readProfile(data) {
  const account = pick(data.accounts);
  const response = http.get(`${BASE}/v1/users/me`, {
    headers: { authorization: `Bearer ${account.accessToken}` },
    tags: { name: 'GET /v1/users/me' },
  });
  check(response, { 'profile 200': (r) => r.status === 200 });
  const trend = execution.scenario.name === 'profile_alone' ? profileAlone : profileDuringStorm;
  trend.add(response.timings.duration);
}

export function logIn(data) {
  const account = pick(data.accounts);
  const response = http.post(
    `${BASE}/v1/auth/login`,
    JSON.stringify({ username: account.username, password: account.password }),
    Object.assign({ tags: { name: 'POST /v1/auth/login' } }, json),
  );
  check(response, { 'login 200': (r) => r.status === 200 });
  login.add(response.timings.duration);
}

export function handleSummary(data) {
  return summaryFiles(data, {
    name: 'auth',
    title: 'auth: login storm beside profile reads',
    description: `${PHASE_SECONDS} s of GET /v1/users/me at ${READ_RATE}/s alone, then ${PHASE_SECONDS} s of the same reads while ${LOGIN_USERS} clients log in back to back (argon2id, 19 MiB, t=2), through the edge.`,
    rows: [
      { metric: 'profile_read_alone', label: 'GET /v1/users/me, alone', seconds: PHASE_SECONDS },
      { metric: 'profile_read_during_storm', label: 'GET /v1/users/me, during the login storm', seconds: PHASE_SECONDS },
      { metric: 'login', label: 'POST /v1/auth/login (the storm)', seconds: PHASE_SECONDS },
    ],
  });
}
