-- wrk script: POST one pre-built multipart/form-data body on every request, then print a JSON summary.
-- Usage: wrk -t1 -c32 -d10s -s benchmarks/wrk/multipart.lua http://127.0.0.1:PORT/classify -- BODY_FILE BOUNDARY
-- BODY_FILE holds the complete body (built by benchmarks/serve_bench.py, CRLF line ends); BOUNDARY its boundary.
-- The summary line starts with "SERVE_BENCH_JSON " so the caller can find it among wrk's own output.

local function read_file(path)
  local f = assert(io.open(path, "rb"), "cannot open body file " .. tostring(path))
  local data = f:read("*a")
  f:close()
  return data
end

function init(args)
  if #args < 2 then
    error("multipart.lua needs two arguments after --: BODY_FILE BOUNDARY")
  end
  wrk.method = "POST"
  wrk.body = read_file(args[1])
  wrk.headers["Content-Type"] = "multipart/form-data; boundary=" .. args[2]
end

-- wrk runs done() once, in the main thread, after all threads finish; latencies are in microseconds.
function done(summary, latency, requests)
  local e = summary.errors
  io.write(string.format(
    'SERVE_BENCH_JSON {"requests": %d, "duration_us": %d, "bytes": %d, ' ..
    '"errors": {"connect": %d, "read": %d, "write": %d, "status": %d, "timeout": %d}, ' ..
    '"latency_us": {"mean": %.1f, "stdev": %.1f, "min": %d, "max": %d, "p50": %d, "p90": %d, "p99": %d}}\n',
    summary.requests, summary.duration, summary.bytes,
    e.connect, e.read, e.write, e.status, e.timeout,
    latency.mean, latency.stdev, latency.min, latency.max,
    latency:percentile(50), latency:percentile(90), latency:percentile(99)))
end
