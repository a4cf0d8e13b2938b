#!/usr/bin/env bash
# pagedserve's OpenAI HTTP front and `transformers serve` (continuous batching where offered) on
# one random-weight 8B-shape checkpoint written to /tmp/ck8 with the tokenizer of TOKENIZER_DIR,
# same text prompts, three rates and saturation (bench/serving.py's --peer-base-url); the peer
# loads the model at its first request, after pagedserve has stopped. JSON under $OUT.
#     OUT=out TOKENIZER_DIR=~/.cache/pagedserve/smollm2-135m-instruct-q4_1-v1 bash bench/serving_peer.sh
set -u
python -c "import transformers; print('transformers', transformers.__version__)"
python -c "from transformers.cli.transformers import main; main()" serve --help > $OUT/tserve_help.txt 2>&1
head -30 $OUT/tserve_help.txt
python bench/random_checkpoint.py --tokenizer "${TOKENIZER_DIR:?set TOKENIZER_DIR to a checkpoint directory with a tokenizer (the default model: ~/.cache/pagedserve/smollm2-135m-instruct-q4_1-v1)}" --out /tmp/ck8 2>&1 | tail -2
CB=""; grep -q -- "--continuous-batching" $OUT/tserve_help.txt && CB="--continuous-batching"
python -c "from transformers.cli.transformers import main; main()" serve $CB --port 8001 --host 127.0.0.1 > $OUT/tserve.log 2>&1 &
PEER=$!
python bench/serving.py --model-dir /tmp/ck8 --backend openai --prompt-format text \
  --peer-base-url http://127.0.0.1:8001/v1 --peer-model /tmp/ck8 --peer-ignore-eos generation-config \
  --rates 2,4,8,inf --num-requests 64 --skip-offline --json $OUT/peer.json 2>&1 | tail -16
kill $PEER; sleep 2; tail -20 $OUT/tserve.log
