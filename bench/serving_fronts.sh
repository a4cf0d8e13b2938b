#!/usr/bin/env bash
# The two fronts of one server on the same workload: one `pagedserve serve` (8B shape, dummy
# weights) with gRPC on :50051 and the OpenAI HTTP API on :8000; bench/serving.py drives gRPC
# and HTTP in turn, two rounds, each with prompts of its own (no prefix-cache help), while
# bench/scrape_metrics.py samples /metrics every second (GPU telemetry under load). Tables on
# stdout, JSON and the samples under $OUT.
#     OUT=out bash bench/serving_fronts.sh          # GPU
# On CPU (a smoke run): MODEL_CMD, ENGINE_FLAGS, RATES and BENCH_FLAGS override the defaults.
set -u
command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv > $OUT/gpu.txt
MODEL_CMD=${MODEL_CMD:-"from pagedserve.workers.models.loader import llama_8b_config as c; c().save_pretrained('/tmp/m8')"}
python -c "$MODEL_CMD"
python -m pagedserve serve --model /tmp/m8 --port 50051 --http-port 8000 --load-format dummy \
  --max-queue-per-replica 1024 ${ENGINE_FLAGS:---device cuda --max-num-seqs 256 --max-model-len 2048 --gpu-memory-utilization 0.9 --dtype bfloat16} > $OUT/server.log 2> $OUT/server.err &
SERVER=$!
for i in $(seq 1 240); do grep -q "^pagedserve: serving" $OUT/server.log && break; sleep 1; done
cat $OUT/server.log
python bench/scrape_metrics.py http://127.0.0.1:8000/metrics $OUT/metrics_scrape.txt &
SCRAPER=$!
seed=10
for round in 1 2; do
  python bench/serving.py --url 127.0.0.1:50051 --backend grpc --rates ${RATES:-16,inf} ${BENCH_FLAGS:-} --seed $seed \
     --skip-offline --json $OUT/fronts_grpc_$round.json 2>&1 | tail -4; seed=$((seed+10))
  python bench/serving.py --base-url http://127.0.0.1:8000/v1 --backend openai --rates ${RATES:-16,inf} ${BENCH_FLAGS:-} \
     --seed $seed --skip-offline --json $OUT/fronts_openai_$round.json 2>&1 | tail -4; seed=$((seed+10))
done
kill $SCRAPER
kill -INT $SERVER; wait $SERVER; echo server exit $?
tail -5 $OUT/server.err
