-- wrk script for perf/cache.py: single-row GraphPipe requests, a share of them repeated.
--   wrk ... -s perf/rows.lua URL -- POOL_FILE TEMPLATE_FILE OFFSET REPEATED MODE START
-- POOL_FILE: bodies of the repeated rows, each prefixed with its length as 8 decimal digits.
-- TEMPLATE_FILE: one body whose 8 bytes at OFFSET are overwritten with a counter, making
-- a row never seen before (MODE "raw"), or whose first three int64 token ids become
-- 1000 + base-4000 digits of the counter (MODE "ids": stays inside a vocabulary).
-- REPEATED: the share (0..1) of requests drawn from the pool. START: the first counter,
-- different for every run so that no run repeats another's "new" rows.
-- Prints one JSON line like post_body.lua's RESULT: requests, rps, p50/p99.
local pool, template, offset, repeated, mode = {}, nil, 0, 0, "raw"
local counter = 0

function init(args)
  local f = assert(io.open(args[1], "rb"))
  local data = f:read("*a")
  f:close()
  local pos = 1
  while pos <= #data do
    local n = tonumber(data:sub(pos, pos + 7))
    pool[#pool + 1] = data:sub(pos + 8, pos + 7 + n)
    pos = pos + 8 + n
  end
  f = assert(io.open(args[2], "rb"))
  template = f:read("*a")
  f:close()
  offset = tonumber(args[3])
  repeated = tonumber(args[4])
  mode = args[5] or "raw"
  counter = tonumber(args[6])
  math.randomseed(counter)
  wrk.method = "POST"
  wrk.headers["Content-Type"] = "application/octet-stream"
end

local function le64(n)             -- n < 2^53, little-endian int64
  local bytes = {}
  for i = 1, 8 do
    bytes[i] = string.char(n % 256)
    n = math.floor(n / 256)
  end
  return table.concat(bytes)
end

local function unique_row()
  counter = counter + 1
  if mode == "ids" then
    local c, ids = counter, {}
    for i = 1, 3 do
      ids[i] = le64(1000 + c % 4000)
      c = math.floor(c / 4000)
    end
    return template:sub(1, offset) .. table.concat(ids) .. template:sub(offset + 25)
  end
  return template:sub(1, offset) .. le64(counter) .. template:sub(offset + 9)
end

function request()
  local body
  if math.random() < repeated then
    body = pool[math.random(1, #pool)]
  else
    body = unique_row()
  end
  return wrk.format(nil, nil, nil, body)
end

function done(summary, latency, requests)
  local secs = summary.duration / 1e6
  local e = summary.errors
  io.write(string.format(
    'RESULT requests=%d secs=%.2f rps=%.2f p50_ms=%.3f p99_ms=%.3f non2xx=%d errors=%d\n',
    summary.requests, secs, summary.requests / secs, latency:percentile(50) / 1000,
    latency:percentile(99) / 1000, e.status, e.connect + e.read + e.write + e.timeout))
end
