-- Every request a new prompt (an all-miss load): "bench <nonce> <thread> <n>".
-- Arguments after "--": the run's nonce, the x-fake-tokens value, optionally a bearer key
-- ("-" for none), "stream" to ask for SSE instead of JSON ("-" for JSON), and extra
-- headers as "Name: value|Name: value" (a hop's own routing headers, Portkey's).
local dir = debug.getinfo(1, "S").source:match("^@(.*/)") or "./"
dofile(dir .. "report.lua")

local threads_made = 0
function setup(thread)
  thread:set("tid", threads_made)
  threads_made = threads_made + 1
end

local counter = 0
local prefix = ""
function init(args)
  prefix = '{"model":"fake-model","messages":[{"role":"user","content":"bench '
    .. (args[1] or "run") .. " " .. tostring(tid) .. " "
  wrk.method = "POST"
  wrk.headers["Content-Type"] = "application/json"
  wrk.headers["x-fake-tokens"] = args[2] or "8"
  if args[3] and args[3] ~= "-" and args[3] ~= "" then
    wrk.headers["Authorization"] = "Bearer " .. args[3]
  end
  if args[4] == "stream" then suffix = '"}],"stream":true}' end
  for pair in string.gmatch(args[5] or "", "[^|]+") do
    local name, value = pair:match("^%s*([^:]+):%s*(.-)%s*$")
    if name then wrk.headers[name] = value end
  end
end

suffix = '"}]}'
function request()
  counter = counter + 1
  return wrk.format(nil, "/v1/chat/completions", nil, prefix .. counter .. suffix)
end
