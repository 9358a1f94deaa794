-- wrk script for bench/placement.py: authenticated requests against the REST API.
--
--   wrk -t1 -c32 -d15s -s bench/wrk_api.lua http://127.0.0.1:8000/api/v1/me/ -- CONFIG MODE
--
-- CONFIG is a text file of "key <api key>", "offer <id>", "horizon <seconds>" and
-- "max_hours <hours>" lines; MODE is "me" (GET the URL) or "reserve" (POST a reservation
-- for quantity 1 of a random offer, starting at a random time within the horizon).
-- Each request uses a random key from the file. When done, one line "BENCH_JSON {...}" on
-- stdout gives the counts per HTTP status and the latency percentiles (microseconds).

local threads = {}

function setup(thread)
  thread:set("id", #threads + 1)
  table.insert(threads, thread)
end

function init(args)
  keys, offers, statuses, samples = {}, {}, {}, {}
  horizon, max_hours = 360 * 86400, 4
  mode = args[2] or "me"
  for line in io.lines(args[1]) do
    local kind, value = line:match("^(%S+)%s+(%S+)$")
    if kind == "key" then
      table.insert(keys, value)
    elseif kind == "offer" then
      table.insert(offers, tonumber(value))
    elseif kind == "horizon" then
      horizon = tonumber(value)
    elseif kind == "max_hours" then
      max_hours = tonumber(value)
    end
  end
  math.randomseed(os.time() * 1000 + id)
end

function request()
  local headers = { ["Authorization"] = "Bearer " .. keys[math.random(#keys)] }
  if mode ~= "reserve" then
    return wrk.format("GET", nil, headers, nil)
  end
  headers["Content-Type"] = "application/json"
  local start = os.time() + math.random(3600, horizon)
  local body = string.format(
    '{"offer": %d, "quantity": 1, "start": "%s", "duration_hours": %d}',
    offers[math.random(#offers)], os.date("!%Y-%m-%dT%H:%M:%SZ", start), math.random(1, max_hours)
  )
  return wrk.format("POST", nil, headers, body)
end

function response(status, headers, body)
  local code = tostring(status)
  statuses[code] = (statuses[code] or 0) + 1
  if status >= 300 and samples[code] == nil then
    samples[code] = string.sub(body or "", 1, 300)
  end
end

local function quote(text)
  return '"' .. text:gsub('[%c"\\]', function(c) return string.format("\\u%04x", c:byte()) end) .. '"'
end

function done(summary, latency, requests)
  local statuses, samples = {}, {}
  for _, thread in ipairs(threads) do
    for code, count in pairs(thread:get("statuses")) do
      statuses[code] = (statuses[code] or 0) + count
    end
    for code, body in pairs(thread:get("samples")) do
      samples[code] = body
    end
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
      .. '"statuses": {%s}, "error_samples": {%s}}\n',
    summary.duration, summary.requests, summary.bytes,
    e.connect, e.read, e.write, e.status, e.timeout,
    latency:percentile(50), latency:percentile(90), latency:percentile(99), latency.max, latency.mean,
    table.concat(parts, ", "), table.concat(bodies, ", ")
  ))
end
