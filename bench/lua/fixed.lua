-- The same prompt on every request (a cache-hit load once it is warm).
-- Arguments after "--": the prompt, the x-fake-tokens value, optionally a bearer key.
local dir = debug.getinfo(1, "S").source:match("^@(.*/)") or "./"
dofile(dir .. "report.lua")

function init(args)
  wrk.method = "POST"
  wrk.path = "/v1/chat/completions"
  wrk.headers["Content-Type"] = "application/json"
  wrk.headers["x-fake-tokens"] = args[2] or "8"
  if args[3] then wrk.headers["Authorization"] = "Bearer " .. args[3] end
  wrk.body = '{"model":"fake-model","messages":[{"role":"user","content":"'
    .. (args[1] or "fixed prompt") .. '"}]}'
end
