-- wrk script for benchmarks/embeddings.py: POST one JSON body per request, cycling through the lines of the
-- file named by the first script argument (one OpenAI /embeddings body per line); the second, if given, is the
-- Content-Type (default application/json).
--   wrk -t1 -c32 -d10s --latency -s benchmarks/peers/embed_wrk.lua http://127.0.0.1:PORT/v1/embeddings -- bodies.jsonl
local bodies = {}
local next_index = 0

function init(args)
  for line in io.lines(args[1]) do
    bodies[#bodies + 1] = line
  end
  wrk.method = "POST"
  wrk.headers["Content-Type"] = args[2] or "application/json"
end

function request()
  next_index = next_index % #bodies + 1
  return wrk.format(nil, nil, nil, bodies[next_index])
end
