"""The softmax decode kernels compile for sm_90 (H100/H200) on a CPU machine, without spilling registers.

As ``test_triton_decode_compile.py``: the interpreter accepts code that the GPU compiler rejects, so this
runs Triton's real pipeline (down to ptxas, shipped in the triton wheel) at the real models' shapes.
"""

import importlib.util
import os

import pytest

from tests.ops.test_triton_decode_compile import resource_usage

pytestmark = [
    pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="needs triton"),
    pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") == "1", reason="compiles real kernels"),
]


def _compile(fn, pointers: dict, ints: list[str], floats: list[str], const: dict, num_warps: int):
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    sig = {n: "*" + t for n, t in pointers.items()} | {n: "i32" for n in ints} | {n: "fp32" for n in floats}
    sig |= {n: "constexpr" for n in const}
    names = list(sig)
    attrs = {(names.index(n),): [["tt.divisibility", 16]] for n in pointers}
    src = ASTSource(fn=fn, signature=sig, constexprs={(names.index(n),): v for n, v in const.items()}, attrs=attrs)
    return triton.compile(src, target=GPUTarget("cuda", 90, 32), options=dict(num_warps=num_warps))


@pytest.mark.parametrize("bounded", [False, True], ids=["branchy", "bounded"])
@pytest.mark.parametrize(
    "dt,G,D,has_mask",
    [
        ("bf16", 3, 64, True),  # SmolLM2-135M: 9 query heads on 3 KV heads (the retrieval layers)
        ("bf16", 7, 64, True),  # Qwen2.5-0.5B: 14 on 2
        ("fp16", 4, 256, False),  # Gemma 3 270M's head dim
        ("fp32", 1, 128, True),  # fp32, IEEE dots
        ("fp32", 2, 256, True),
    ],
)
def test_split_and_merge_compile_for_sm90_without_spills(dt, G, D, has_mask, bounded):
    from linearize.ops.triton.softmax_decode import _combine_kernel, _pow2, _split_kernel, default_launch, default_num_warps

    size = {"bf16": 2, "fp16": 2, "fp32": 4}[dt]
    BN, NS, _ = default_launch(64, 3, 4224, D, size)
    GP, DP = max(16, _pow2(G)), max(16, _pow2(D))
    split = _compile(
        _split_kernel,
        {"Q": dt, "K": dt, "V": dt, "MASK": "u8", "ACC": "fp32", "M": "fp32", "LSE": "fp32"},
        ["sQ_b", "sQ_h", "sK_b", "sK_h", "sK_l", "sV_b", "sV_h", "sV_l", "sM_b", "sM_l", "L", "Hkv", "NS", "blocks_per_split"],
        ["scale"],
        dict(G=G, GP=GP, D=D, DP=DP, BN=BN, HAS_MASK=has_mask, IEEE=dt == "fp32", BOUNDED=bounded, CH=1024),
        num_warps=default_num_warps(D, size),
    )
    merge = _compile(
        _combine_kernel, {"ACC": "fp32", "M": "fp32", "LSE": "fp32", "Y": dt}, ["sY_b", "sY_h", "Hkv"], [],
        dict(NS=NS, G=G, GP=GP, D=D, DP=DP), num_warps=default_num_warps(D, size),
    )
    for name, kernel in (("split", split), ("merge", merge)):
        use = resource_usage(kernel)
        assert use["STACK"] == 0 and use.get("LOCAL", 0) == 0, f"{name}: register spills: {use}"
    if dt != "fp32":
        assert "mma" in split.asm["ptx"], "the dots did not lower to tensor-core MMA"
