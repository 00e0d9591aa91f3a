"""Every Triton kernel of the model compiles for a GPU, checked without one.

The CPU tests run the kernels in Triton's interpreter, which checks what they compute but not that
they compile: a kernel can run interpreted and still be refused by the compiler (a loop-carried value
whose shape changes, say). Here the whole model runs once with kernel_backend="triton" (forward and
backward in both gate modes, padded and dense rows, decode steps over a fold), every kernel launch is
recorded with its argument types and constants (float32, and bfloat16 under autocast), and a fresh
process without the interpreter compiles each kernel ahead of time for an H100 (sm_90: Triton's own
compiler down to a cubin, no device needed).
"""

import inspect
import json
import subprocess
import sys

import pytest
import torch
from common import random_ids, tiny_model

triton = pytest.importorskip("triton")
interpreter = pytest.importorskip("triton.runtime.interpreter")

pytestmark = pytest.mark.skipif(torch.cuda.is_available(), reason="the GPU tests compile the kernels by running them")

TYPES = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16", torch.int64: "i64",
         torch.int32: "i32", torch.int8: "i8", torch.bool: "i1"}

COMPILE = r"""
import importlib, json, sys
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

failed = []
for launch in json.load(sys.stdin):
    kernel = getattr(importlib.import_module(launch["module"]), launch["name"])
    while not isinstance(kernel, triton.runtime.JITFunction):  # under @triton.heuristics or @triton.autotune
        kernel = kernel.fn
    source = ASTSource(fn=kernel, signature=launch["signature"],
                       constexprs={(i,): v for i, v in launch["constexprs"]})
    try:
        triton.compile(source, target=GPUTarget("cuda", 90, 32), options=launch["options"])
    except Exception as err:  # the compiler's own error types
        failed.append(f"{launch['name']}: {type(err).__name__}: {str(err)[-600:]}")
print(json.dumps(failed))
"""


def _describe(fn, args, kwargs):
    """A launch as (module, name, {param: Triton type or "constexpr"}, [(index, constant)], options)."""
    params = list(inspect.signature(fn).parameters.values())
    values = dict(zip([p.name for p in params], args))
    options = {k: kwargs.pop(k) for k in ("num_warps", "num_stages") if k in kwargs}
    values.update(kwargs)
    signature, constexprs = {}, []
    for i, p in enumerate(params):
        value = values.get(p.name, p.default)
        if "constexpr" in str(p.annotation):
            signature[p.name] = "constexpr"
            constexprs.append((i, value))
        elif isinstance(value, torch.Tensor):
            signature[p.name] = "*" + TYPES[value.dtype]
        elif isinstance(value, bool):
            signature[p.name] = "i1"
        elif isinstance(value, int):
            signature[p.name] = "i32" if -2**31 <= value < 2**31 else "i64"
        else:
            signature[p.name] = "fp32"
    return {"module": fn.__module__, "name": fn.__name__, "signature": signature, "constexprs": constexprs,
            "options": options}


def test_every_kernel_compiles_for_an_h100(monkeypatch):
    launches = {}
    run = interpreter.InterpretedFunction.run

    def record(self, *args, grid, warmup, **kwargs):
        dtypes = tuple(str(a.dtype) for a in args if isinstance(a, torch.Tensor))
        key = (self.fn.__module__, self.fn.__name__, dtypes)
        if key not in launches:
            launches[key] = _describe(self.fn, args, dict(kwargs))
        return run(self, *args, grid=grid, warmup=warmup, **kwargs)

    monkeypatch.setattr(interpreter.InterpretedFunction, "run", record)
    ids = random_ids((2, 20))
    mask = torch.ones(2, 20, dtype=torch.long)
    mask[1, :3] = 0
    for gate, bf16 in (("input", False), ("state", False), ("input", True)):  # bf16: autocast, as on a GPU
        model = tiny_model(kernel_backend="triton", recurrence_gate=gate).train()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            loss = model(ids, attention_mask=mask, labels=ids).loss + model(ids[:1], labels=ids[:1]).loss
        loss.backward()
        with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            cache = model(ids[:, :15], attention_mask=mask[:, :15], use_cache=True).cache
            for t in range(15, 18):
                cache = model(ids[:, t:t + 1], attention_mask=mask[:, :t + 1], cache=cache).cache
    # the one-launch routing runs on a GPU only (its programs wait for one another); one program a row here
    from mm_rec.memory_triton import route_segments_triton

    route_segments_triton(torch.randn(2, 3, 5, 24), torch.randn(2, 4, 24), torch.randn(4, 24),
                          torch.zeros(2, 3, dtype=torch.bool), 0.9, programs_per_row=1)
    names = {name for _, name, _ in launches}
    assert any(dtype == "torch.bfloat16" for _, _, dtypes in launches for dtype in dtypes)
    assert {"_decode_kernel", "_route_kernel", "_fold_kernel", "_routing_kernel", "_cross_entropy_kernel",
            "_short_conv_fwd_kernel", "_short_conv_bwd_kernel", "_recurrence_inputs_fwd_kernel",
            "_recurrence_inputs_bwd_kernel", "_readout_fwd_kernel", "_readout_bwd_kernel"} <= names, names
    env = {k: v for k, v in __import__("os").environ.items() if k != "TRITON_INTERPRET"}
    done = subprocess.run([sys.executable, "-c", COMPILE], input=json.dumps(list(launches.values())), env=env,
                          capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stderr[-3000:]
    failed = json.loads(done.stdout.strip().splitlines()[-1])
    assert failed == [], "\n\n".join(failed)
