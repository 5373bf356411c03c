-- wrk script: every request names a random room out of $ROOMS (default 10000) in the
-- query, so the router, HAProxy (balance url_param room) and nginx (hash $arg_room) all
-- hash the same key. The path /status exists on the demo nodes (a small JSON answer).
local rooms = tonumber(os.getenv("ROOMS") or "10000")
-- The request path up to the room number (router-lookup uses "/v1/placement/r").
local prefix = os.getenv("WRK_PATH") or "/status?room=r"
local counter = 0
function setup(thread)
  counter = counter + 1
  thread:set("seed", counter * 7919)
end
function init(args)
  math.randomseed(seed or 1)
end
request = function()
  return wrk.format("GET", prefix .. math.random(1, rooms))
end
