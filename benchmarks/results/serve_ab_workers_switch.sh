cd /work/main; source .venv/bin/activate
B=$(cat /tmp/prof/boundary)
for cfg in "w1" "w2:SATML_WORKERS=2" "sw02:SATML_SWITCH_INTERVAL_MS=0.2" "w1" "w2:SATML_WORKERS=2"; do
  name=${cfg%%:*}; extra=""; [ "$cfg" != "$name" ] && extra=${cfg#*:}
  PORT=8791
  env $extra SATML_ARTIFACTS_DIR=/tmp/prof/arts SATML_HOST=127.0.0.1 SATML_PORT=$PORT SATML_LOG_LEVEL=warning satml-serve > /tmp/ab/$name.log 2>&1 &
  SP=$!
  for i in $(seq 200); do curl -sf http://127.0.0.1:$PORT/health/ready >/dev/null && break; sleep 0.25; done
  sleep 1
  wrk -t1 -c8 -d2s -s benchmarks/wrk/multipart.lua http://127.0.0.1:$PORT/classify -- /tmp/prof/body1.bin $B >/dev/null
  for pt in "1 1" "1 32" "8 32"; do set -- $pt
    out=$(wrk -t1 -c$2 -d8s --timeout 30s -s benchmarks/wrk/multipart.lua http://127.0.0.1:$PORT/classify -- /tmp/prof/body$1.bin $B | grep SERVE_BENCH_JSON)
    echo "$name ${1}x$2 $out"
  done
  kill $SP; wait $SP 2>/dev/null; sleep 1
done
