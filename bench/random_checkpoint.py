"""A random-weight checkpoint on disk, for peers that only load files (`transformers serve`,
vLLM): the 8B or 70B shape with the vocabulary of a given tokenizer, whose files are copied in.
pagedserve's own benchmarks need none of this (`--load-format dummy`).

    python bench/random_checkpoint.py \
        --tokenizer ~/.cache/pagedserve/smollm2-135m-instruct-q4_1-v1 \
        --out /tmp/llama-8b-random
"""

from __future__ import annotations

import argparse
import json
import logging
import shutil
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from pagedserve.workers.models.loader import llama_8b_config, llama_70b_config  # noqa: E402

SHAPES = {"llama-3-8b": llama_8b_config, "llama-3-70b": llama_70b_config}
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja",
                   "special_tokens_map.json")
# Random embeddings' scale: wide enough that greedy decoding does not collapse to one token.
INIT_STD = 0.02

logger = logging.getLogger("random_checkpoint")


def write_checkpoint(shape: str, tokenizer_dir: Path, out: Path, device: str) -> None:
    from transformers import GenerationConfig, LlamaForCausalLM

    config = SHAPES[shape]()
    tokenizer_config = json.loads((tokenizer_dir / "config.json").read_text())
    config.vocab_size = tokenizer_config["vocab_size"]
    config.bos_token_id = tokenizer_config.get("bos_token_id")
    config.eos_token_id = tokenizer_config.get("eos_token_id")
    config.initializer_range = INIT_STD
    config.dtype = torch.bfloat16
    with torch.device(device):
        model = LlamaForCausalLM(config).to(torch.bfloat16)
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out, safe_serialization=True)
    GenerationConfig(bos_token_id=config.bos_token_id,
                     eos_token_id=config.eos_token_id).save_pretrained(out)
    for name in TOKENIZER_FILES:
        if (tokenizer_dir / name).exists():
            shutil.copy(tokenizer_dir / name, out / name)
    logger.info("wrote %s (%s, vocab %d) to %s", shape, "bf16", config.vocab_size, out)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shape", choices=sorted(SHAPES), default="llama-3-8b")
    parser.add_argument("--tokenizer", required=True, type=Path,
                        help="a checkpoint directory whose tokenizer (and vocab size) to use")
    parser.add_argument("--out", required=True, type=Path)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu",
                        help="where the random weights are drawn (cuda: seconds, not minutes)")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    write_checkpoint(args.shape, args.tokenizer, args.out, args.device)


if __name__ == "__main__":
    main()
