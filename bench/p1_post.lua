-- wrk script for bench/p1_submit.py: POST a small JSON prompt.
-- Arguments (after `--`): mode ("api" or "bare"), API token, run nonce.
-- In "api" mode every request carries `Authorization: Token ...` and a unique
-- Idempotency-Key (<nonce>-<thread id>-<counter>), so no request is a replay.

local thread_ids = 0

function setup(thread)
  thread_ids = thread_ids + 1
  thread:set("tid", thread_ids)
end

local mode, token, nonce
local counter = 0
local body = '{"prompt":"Say hello in one short sentence.","priority":"normal"}'

function init(args)
  mode = args[1] or "api"
  token = args[2] or ""
  nonce = args[3] or "0"
  wrk.method = "POST"
  wrk.body = body
  wrk.headers["Content-Type"] = "application/json"
  if mode == "api" then
    wrk.headers["Authorization"] = "Token " .. token
  end
end

function request()
  if mode ~= "api" then
    return wrk.format()
  end
  counter = counter + 1
  -- wrk.format replaces wrk.headers when given a table, so pass them all.
  local headers = {
    ["Content-Type"] = "application/json",
    ["Authorization"] = "Token " .. token,
    ["Idempotency-Key"] = nonce .. "-" .. tostring(tid) .. "-" .. tostring(counter),
  }
  return wrk.format(nil, nil, headers)
end
