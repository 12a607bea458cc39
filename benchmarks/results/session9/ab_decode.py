import time, torch
from qwenlite.model import load_model
try:
    from qwenlite.accel import apply
    model = apply(load_model("/work/standin")); from qwenlite.evaluation.generation import generate
except ImportError:
    model = load_model("/work/standin"); from qwenlite.generate import generate
g = torch.Generator().manual_seed(0)
prompts = [torch.randint(15, 27, (300,), generator=g).tolist() for _ in range(8)]
generate(model, prompts, 5, eos_token_id=[])
t = time.perf_counter(); out = generate(model, prompts, 40, eos_token_id=[]); print("total", time.perf_counter() - t, getattr(out, "seconds", None), getattr(out, "decode_seconds", None))
