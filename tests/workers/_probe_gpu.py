import time, json, os, torch, tempfile
from transformers import AutoModelForCausalLM
from pagedserve.workers.loader import llama_8b_config, load_model
from tests.helpers.paged_runner import PagedRunner
from tests.helpers.tiny_models import save_tiny_checkpoint
res = {}
d = tempfile.mkdtemp()
ck = save_tiny_checkpoint(d + "/q3", "qwen3")
toks = torch.randint(3, 256, (40,)).tolist()
hf = AutoModelForCausalLM.from_pretrained(ck, dtype=torch.bfloat16).cuda()
ref = hf(torch.tensor([toks], device="cuda")).logits[0].float()
m = load_model(ck, dtype="bfloat16", device="cuda")
ours = PagedRunner(m).step([("a", toks)])[0]
res["bf16_tiny_maxdiff"] = (ours - ref).abs().max().item()
res["bf16_tiny_argmax_agree"] = (ours.argmax(-1) == ref.argmax(-1)).float().mean().item()
t = time.time(); model = load_model(llama_8b_config(), device="cuda", load_format="dummy"); torch.cuda.synchronize()
res["dummy8b_load_s"] = time.time() - t
res["mem_after_load_gb"] = torch.cuda.memory_allocated() / 2**30
r = PagedRunner(model, num_blocks=2048, block_size=16)
with torch.no_grad():
    chunks = [(f"s{i}", list(range(100, 612))) for i in range(4)]
    r.step(chunks); torch.cuda.synchronize()
    r2 = PagedRunner(model, num_blocks=2048, block_size=16)
    t = time.time(); r2.step(chunks); torch.cuda.synchronize(); res["prefill_4x512_s"] = time.time() - t
    dec = [(f"s{i}", [5]) for i in range(4)]
    for _ in range(3): r2.step(dec)
    torch.cuda.synchronize(); t = time.time()
    for _ in range(10): r2.step(dec)
    torch.cuda.synchronize(); res["decode_b4_step_ms"] = (time.time() - t) * 100
res["peak_gb"] = torch.cuda.max_memory_allocated() / 2**30
print(json.dumps(res, indent=1))
