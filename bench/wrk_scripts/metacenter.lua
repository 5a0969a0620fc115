-- wrk script of the metacenter benchmark (bench/, docs/performance.md).
--
--   wrk -t C -c C -d S -s metacenter.lua URL -- MODE CLUSTER NONCE ENGINES [EXTRA]
--
-- The harness always runs as many threads as connections, so the sequence of
-- requests a thread's Lua state generates is the sequence of one connection:
-- in "gateway" mode each connection drives whole routed requests in the
-- gateway's order, one at a time:
--   POST /v1/load/stats (add, unique request id)  GET /v1/load/stats?cluster=
--   DELETE /v1/load/prompt                        GET ...
--   DELETE /v1/load/stats                         GET ...
--
-- Modes: gateway, add, prompt, delete, query, cache_save, cache_query.
-- Request ids look like UUIDs (36 characters) and are unique across threads
-- (thread number) and runs (NONCE, 8 hex digits). "prompt" and "delete" walk
-- the ids an "add" run made on the same thread: EXTRA is the comma separated
-- count of ids per thread; past it they start again (then a delete finds a
-- tombstone; the number of such wraps is reported).
-- cache_save: EXTRA is a file of lines "IP<TAB>h1,h2,...": each request saves
-- that prefix on that engine plus TAIL unique new hashes (TAIL = 6th arg).
-- cache_query: EXTRA is a file with one JSON body per line, used in turn.
--
-- done() prints one line "BENCHJSON {...}" that the harness parses.

local counter = 0
local threads = {}

function setup(thread)
   thread:set("tid", counter)
   counter = counter + 1
   table.insert(threads, thread)
end

local mode, cluster, nonce, engines
k = 0                -- (global: done() reads it) requests (or routed requests, in gateway mode) made
local step = 0       -- gateway mode: position in the six-step sequence
local limit = nil    -- prompt/delete: ids made by the add run on this thread
wraps = 0
local lines = {}     -- cache modes
local tail = 0
local salt = 0
local query_path
local add_headers = {["Content-Type"] = "application/json"}

local function rid(n)
   return string.format("%s-%04x-4000-8000-%012x", nonce, tid, n)
end

local function engine_ip(n)
   local e = (tid * 7 + n) % engines
   return string.format("10.%d.%d.%d", 100 + math.floor(e / 65536), math.floor(e / 256) % 256, e % 256)
end

local function add(n)
   local body = string.format(
      '{"cluster":"%s","request_id":"%s","prompt_length":%d,"ip":"%s"}',
      cluster, rid(n), 1000 + (n * 37) % 4000, engine_ip(n))
   return wrk.format("POST", "/v1/load/stats", add_headers, body)
end

-- The gateway serialises its whole request struct and sets no Content-Type.
local function del(path, n)
   local body = string.format('{"request_id":"%s","cluster":"","ip":""}', rid(n))
   return wrk.format("DELETE", path, {}, body)
end

local function query()
   return wrk.format("GET", query_path, {})
end

function init(args)
   mode = args[1]
   cluster = args[2]
   nonce = args[3]
   engines = tonumber(args[4])
   query_path = "/v1/load/stats?cluster=" .. cluster
   if mode == "prompt" or mode == "delete" then
      local i = 0
      for count in string.gmatch(args[5], "[^,]+") do
         if i == tid then limit = tonumber(count) end
         i = i + 1
      end
      if limit == nil or limit < 1 then limit = 1 end
   elseif mode == "cache_save" or mode == "cache_query" then
      for line in io.lines(args[5]) do
         if mode == "cache_save" then
            local ip, hashes = line:match("^([^\t]+)\t(.*)$")
            table.insert(lines, {ip, hashes})
         else
            table.insert(lines, line)
         end
      end
      tail = tonumber(args[6] or "0")
      salt = tonumber(args[7] or "0")
      k = tid * 7919  -- threads start at different lines
   end
end

local function unique_tail(n)
   -- TAIL hashes no other request (of any thread or run) uses: below 2^53,
   -- exact in Lua numbers, far from the random 64-bit hashes of the documents.
   local base = (salt * 64 + tid) * 4294967296 + n * 1024
   local parts = {}
   for i = 0, tail - 1 do
      parts[i + 1] = string.format("%.0f", base + i)
   end
   return table.concat(parts, ",")
end

request = function()
   if mode == "gateway" then
      local s = step
      step = (step + 1) % 6
      if s == 0 then
         return add(k)
      elseif s == 2 then
         return del("/v1/load/prompt", k)
      elseif s == 4 then
         local n = k
         k = k + 1
         return del("/v1/load/stats", n)
      end
      return query()
   elseif mode == "add" then
      k = k + 1
      return add(k - 1)
   elseif mode == "prompt" or mode == "delete" then
      local n = k % limit
      if k > 0 and n == 0 then wraps = wraps + 1 end
      k = k + 1
      return del(mode == "prompt" and "/v1/load/prompt" or "/v1/load/stats", n)
   elseif mode == "query" then
      k = k + 1
      return query()
   elseif mode == "cache_save" then
      local line = lines[(k % #lines) + 1]
      local hashes = line[2]
      if tail > 0 then hashes = hashes .. "," .. unique_tail(k) end
      k = k + 1
      local body = string.format('{"cluster":"%s","ip":"%s","prompt_hash":[%s]}', cluster, line[1], hashes)
      return wrk.format("POST", "/v1/cache/save", add_headers, body)
   elseif mode == "cache_query" then
      local body = lines[(k % #lines) + 1]
      k = k + 1
      return wrk.format("POST", "/v1/cache/query", add_headers, body)
   end
   error("unknown mode " .. tostring(mode))
end

local function json_number(x)
   if x ~= x or x == math.huge or x == -math.huge then return "null" end
   return string.format("%.3f", x)
end

function done(summary, latency, requests)
   local counts, wrapped = {}, 0
   for _, t in ipairs(threads) do
      table.insert(counts, tostring(t:get("k") or 0))
      wrapped = wrapped + (t:get("wraps") or 0)
   end
   local e = summary.errors
   local out = {
      '"requests":' .. summary.requests,
      '"duration_us":' .. summary.duration,
      '"bytes":' .. summary.bytes,
      '"errors":{"connect":' .. e.connect .. ',"read":' .. e.read .. ',"write":' .. e.write ..
         ',"status":' .. e.status .. ',"timeout":' .. e.timeout .. '}',
      '"latency_us":{"mean":' .. json_number(latency.mean) .. ',"stdev":' .. json_number(latency.stdev) ..
         ',"min":' .. latency.min .. ',"max":' .. latency.max ..
         ',"p50":' .. latency:percentile(50) .. ',"p90":' .. latency:percentile(90) ..
         ',"p99":' .. latency:percentile(99) .. ',"p999":' .. latency:percentile(99.9) .. '}',
      '"per_thread":[' .. table.concat(counts, ",") .. ']',
      '"wraps":' .. wrapped,
   }
   io.write("BENCHJSON {" .. table.concat(out, ",") .. "}\n")
end
