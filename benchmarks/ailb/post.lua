-- wrk script: one non-stream chat completion per request (model/key filled in by env)
wrk.method = "POST"
wrk.headers["Content-Type"] = "application/json"
wrk.headers["Authorization"] = "Bearer " .. (os.getenv("BENCH_KEY") or "sk-bench")
wrk.body = '{"model":"gpt-fake","messages":[{"role":"user","content":"hi"}]}'
