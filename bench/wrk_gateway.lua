-- wrk script for bench/gateway.py: one fixed POST, again and again, on kept-alive connections.
--
--   wrk -t1 -c8 -d8s -s bench/wrk_gateway.lua http://127.0.0.1:PORT/v1/embeddings -- REQUEST
--
-- REQUEST is a file of header lines ("Name: value"), an empty line, then the body, sent as it is
-- (the gateway's Authorization header, or the replica's secret header for a direct call). The request
-- is built once (no request() function: wrk sends the same bytes each time). When done, one line
-- "BENCH_JSON {...}" on stdout gives the counts per HTTP status, how the answers were framed
-- (content-length or chunked) and the latency percentiles (microseconds).

local threads = {}

function setup(thread)
  table.insert(threads, thread)
end

function init(args)
  statuses, samples, framing = {}, {}, { length = 0, chunked = 0 }
  local file = assert(io.open(args[1], "rb"))
  local text = file:read("*a")
  file:close()
  local head, body = text:match("^(.-)\r?\n\r?\n(.*)$")
  local headers = {}
  for line in head:gmatch("[^\r\n]+") do
    local name, value = line:match("^([^:]+):%s*(.*)$")
    headers[name] = value
  end
  wrk.method, wrk.headers, wrk.body = "POST", headers, body
end

function response(status, headers, body)
  local code = tostring(status)
  statuses[code] = (statuses[code] or 0) + 1
  if status >= 300 and samples[code] == nil then
    samples[code] = string.sub(body or "", 1, 300)
  end
  if headers["Transfer-Encoding"] or headers["transfer-encoding"] then
    framing.chunked = framing.chunked + 1
  else
    framing.length = framing.length + 1
  end
end

local function quote(text)
  return '"' .. text:gsub('[%c"\\]', function(c) return string.format("\\u%04x", c:byte()) end) .. '"'
end

function done(summary, latency, requests)
  local statuses, samples, length, chunked = {}, {}, 0, 0
  for _, thread in ipairs(threads) do
    for code, count in pairs(thread:get("statuses")) do
      statuses[code] = (statuses[code] or 0) + count
    end
    for code, body in pairs(thread:get("samples")) do
      samples[code] = body
    end
    local framing = thread:get("framing")
    length, chunked = length + framing.length, chunked + framing.chunked
  end
  local parts = {}
  for code, count in pairs(statuses) do
    table.insert(parts, string.format('"%s": %d', code, count))
  end
  local bodies = {}
  for code, body in pairs(samples) do
    table.insert(bodies, string.format('"%s": %s', code, quote(body)))
  end
  local e = summary.errors
  io.write(string.format(
    'BENCH_JSON {"duration_us": %d, "requests": %d, "bytes": %d, '
      .. '"errors": {"connect": %d, "read": %d, "write": %d, "status": %d, "timeout": %d}, '
      .. '"latency_us": {"p50": %d, "p90": %d, "p99": %d, "max": %d, "mean": %.1f}, '
      .. '"framing": {"content_length": %d, "chunked": %d}, '
      .. '"statuses": {%s}, "error_samples": {%s}}\n',
    summary.duration, summary.requests, summary.bytes,
    e.connect, e.read, e.write, e.status, e.timeout,
    latency:percentile(50), latency:percentile(90), latency:percentile(99), latency.max, latency.mean,
    length, chunked,
    table.concat(parts, ", "), table.concat(bodies, ", ")
  ))
end
