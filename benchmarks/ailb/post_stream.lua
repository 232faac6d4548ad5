-- wrk script: one streamed chat completion per request (SSE relayed to the end)
wrk.method = "POST"
wrk.headers["Content-Type"] = "application/json"
wrk.headers["Authorization"] = "Bearer " .. (os.getenv("BENCH_KEY") or "sk-bench")
wrk.body = '{"model":"gpt-fake","messages":[{"role":"user","content":"hi"}],"stream":true}'
