-- wrk script for `cargo xtask load telemetry`: one-event telemetry batches, POSTed back to back on
-- every connection through the edge. wrk (C, an event loop per thread) costs far less CPU per
-- request than k6, so on a shared 2-core machine it is not what limits the figure.
local token = os.getenv("TOKEN")

wrk.method = "POST"
wrk.headers["Content-Type"] = "application/json"
wrk.headers["Authorization"] = "Bearer " .. token

function request()
  local body = string.format(
    '[{"name":"app.open","at":"%s","props":{"screen":"home","build":42}}]',
    os.date("!%Y-%m-%dT%H:%M:%SZ"))
  return wrk.format(nil, nil, nil, body)
end

function done(summary, latency, requests)
  io.write(string.format(
    "REPORT requests=%d duration_us=%d status_errors=%d connect_errors=%d read_errors=%d write_errors=%d timeouts=%d p50_us=%d p99_us=%d max_us=%d\n",
    summary.requests, summary.duration, summary.errors.status, summary.errors.connect,
    summary.errors.read, summary.errors.write, summary.errors.timeout,
    latency:percentile(50), latency:percentile(99), latency.max))
end
