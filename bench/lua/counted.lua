-- distinct.lua (same arguments), stopping after a fixed number of responses: the
-- count comes from the environment, BENCH_STOP_AFTER, so the arguments stay the same.
-- Reading every response in Lua slows wrk a little; only the CPU runs use it. wrk still
-- runs its whole -d duration (idle once stopped), so callers size it to the count.
local dir = debug.getinfo(1, "S").source:match("^@(.*/)") or "./"
dofile(dir .. "distinct.lua")

local stop_after = tonumber(os.getenv("BENCH_STOP_AFTER") or "0") or 0
local responses = 0
function response(status, headers, body)
  responses = responses + 1
  if stop_after > 0 and responses >= stop_after then wrk.thread:stop() end
end
