"""gpu_kernels.py's Triton kernels on CUDA, or without a GPU in Triton's CPU
interpreter (tests/triton_interpreter.py): each kernel against its torch reference, the fused
model forward against the plain one, the padded decode-graph path against eager steps."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import torch

from tests.triton_interpreter import use_interpreter_unless_cuda

CUDA = use_interpreter_unless_cuda()

from workers.builtin import gpu_kernels  # noqa: E402
from workers.builtin.attention import SdpaPagedAttention, SeqSlice, TritonPagedAttention  # noqa: E402
from workers.builtin.config import load_model_config  # noqa: E402
from workers.builtin.cuda_graphs import DecodeGraphs  # noqa: E402
from workers.builtin.kv_cache import KVCache  # noqa: E402
from workers.builtin.loader import load_model  # noqa: E402
from workers.builtin.model import LlamaForCausalLM  # noqa: E402
from workers.builtin.prefill_graphs import PrefillGraphs  # noqa: E402
from workers.builtin.runner import ModelRunner, StepInput  # noqa: E402
from workers.builtin.sampling import SampleRow, SamplingParams  # noqa: E402

CPU = torch.device("cpu")
DEV = torch.device("cuda" if CUDA else "cpu")


@pytest.fixture(autouse=True)
def on_device() -> Iterator[None]:
    with torch.device(DEV):
        yield


@pytest.mark.parametrize("heads_first", [False, True])
@pytest.mark.parametrize("full_dot", [False, True])
def test_paged_decode_attention_matches_sdpa_over_scattered_blocks(heads_first: bool, full_dot: bool,
                                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(gpu_kernels, "DECODE_FULL_DOT", full_dot)
    torch.manual_seed(0)
    heads, kv_heads, head_dim, page = 8, 2, 32, 4
    k_cache = torch.randn(12, page, kv_heads, head_dim)
    v_cache = torch.randn(12, page, kv_heads, head_dim)
    tables = [[11, 2, 7, 5], [0], [3, 9], [4]]
    lens = [15, 3, 8, 0]  # the last row is graph padding: zeros out
    q = torch.randn(4, heads, head_dim)
    bt = torch.tensor([t + [0] * (4 - len(t)) for t in tables], dtype=torch.int32)
    out = gpu_kernels.paged_decode_attention(
        q, k_cache, v_cache, bt, torch.tensor(lens, dtype=torch.int32), 0.2, heads_first=heads_first)
    for b in range(3):
        keys = k_cache[tables[b]].reshape(-1, kv_heads, head_dim)[: lens[b]].repeat_interleave(4, dim=1)
        values = v_cache[tables[b]].reshape(-1, kv_heads, head_dim)[: lens[b]].repeat_interleave(4, dim=1)
        scores = torch.einsum("hd,thd->ht", q[b], keys) * 0.2
        ref = torch.einsum("ht,thd->hd", scores.softmax(-1), values)
        torch.testing.assert_close(out[b], ref, atol=1e-4, rtol=1e-4)
    assert torch.all(out[3] == 0)


@pytest.mark.parametrize("qk_norm", [False, True])
@pytest.mark.parametrize("full_dot", [False, True])
def test_rope_decode_attention_equals_rope_then_decode(qk_norm: bool, full_dot: bool,
                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    """The fused decode kernel (RoPE, K/V write and attention in one launch, the new token's
    score from registers) against rope_store_kv + paged_decode_attention on the same step:
    the same cache contents and outputs; a padded row (slot -1, length 0) writes nothing.
    full_dot: the fused kernel's scores as one product over whole key rows (the reference's
    per half)."""
    torch.manual_seed(3)
    heads, kv_heads, head_dim, page = 8, 2, 32, 4
    positions = torch.tensor([14, 2, 0, 0])
    slots = torch.tensor([5 * page + 2, 9 * page + 2, 3 * page, -1])
    tables = torch.tensor([[11, 2, 7, 5], [9, 0, 0, 0], [3, 0, 0, 0], [0, 0, 0, 0]], dtype=torch.int32)
    lens = torch.tensor([15, 3, 1, 0], dtype=torch.int32)
    k_cache, v_cache = torch.randn(12, page, kv_heads, head_dim), torch.randn(12, page, kv_heads, head_dim)
    qkv = torch.randn(4, (heads + 2 * kv_heads) * head_dim)
    freqs = torch.arange(32).float()[:, None] * (1.0 / 10000 ** (torch.arange(0, head_dim, 2).float() / head_dim))
    emb = torch.cat([freqs, freqs], -1)
    norm = (torch.rand(head_dim) + 0.5, torch.rand(head_dim) + 0.5, 1e-6) if qk_norm else None
    k_ref, v_ref, qkv_ref = k_cache.clone(), v_cache.clone(), qkv.clone()
    gpu_kernels.rope_store_kv(qkv_ref, positions, emb.cos(), emb.sin(), heads, kv_heads, head_dim,
                              k_ref, v_ref, slots, norm)
    q = qkv_ref[:, : heads * head_dim].view(4, heads, head_dim)
    expected = gpu_kernels.paged_decode_attention(q, k_ref, v_ref, tables, lens, 0.2)
    monkeypatch.setattr(gpu_kernels, "DECODE_FULL_DOT", full_dot)
    out = gpu_kernels.rope_decode_attention(qkv, positions, emb.cos(), emb.sin(), heads, k_cache, v_cache, slots,
                                            tables, lens, 0.2, norm)
    torch.testing.assert_close(k_cache, k_ref)
    torch.testing.assert_close(v_cache, v_ref)
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-5)
    assert torch.all(out[3] == 0)


def test_decode_tiling_is_chosen_by_batch_and_every_tiling_gives_the_same_attention(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """DECODE_TILES picks the decode kernel's tiling by the step's batch (a graph's is fixed at
    capture); a context of several tiles of 16 keys attends as one tile of 128 does."""
    tiling = gpu_kernels.DecodeTiling
    monkeypatch.setattr(gpu_kernels, "DECODE_TILES", [(2, tiling(16, 0, 2)), (16, tiling(32, 2, 1))])
    assert gpu_kernels.decode_tiling(1) == gpu_kernels.decode_tiling(2) == (16, 0, 2)
    assert gpu_kernels.decode_tiling(3) == (32, 2, 1)
    assert gpu_kernels.decode_tiling(1000) == (32, 2, 1)  # past every bound: the last entry
    torch.manual_seed(5)
    heads, kv_heads, head_dim, page = 4, 2, 16, 4
    k_cache, v_cache = torch.randn(24, page, kv_heads, head_dim), torch.randn(24, page, kv_heads, head_dim)
    tables = torch.tensor([list(range(23, 13, -1)), list(range(10))], dtype=torch.int32)
    lens = torch.tensor([37, 9], dtype=torch.int32)  # 3 tiles of 16 keys and 1, the last ones partial
    q = torch.randn(2, heads, head_dim)
    small = gpu_kernels.paged_decode_attention(q, k_cache, v_cache, tables, lens, 0.25)
    monkeypatch.setattr(gpu_kernels, "DECODE_TILES", [(1 << 30, tiling(128, 0, 2))])
    whole = gpu_kernels.paged_decode_attention(q, k_cache, v_cache, tables, lens, 0.25)
    torch.testing.assert_close(small, whole, atol=1e-5, rtol=1e-5)


def test_split_k_partials_sum_to_the_projection_in_their_consumers() -> None:
    torch.manual_seed(4)
    x, weight = torch.randn(3, 64), torch.randn(40, 64)
    parts = gpu_kernels.split_k_linear(x, weight, 4)
    assert parts.shape == (4, 3, 40) and parts.dtype == torch.float32
    torch.testing.assert_close(parts.sum(0), x @ weight.T, atol=1e-4, rtol=1e-4)
    # The norm after o: the partials' sum plus the residual, normalised.
    residual, w = torch.randn(3, 40), torch.randn(40)
    out, res = gpu_kernels.rms_norm(parts, w, 1e-6, residual)
    ref_out, ref_res = gpu_kernels.rms_norm(parts.sum(0), w, 1e-6, residual)
    torch.testing.assert_close(res, ref_res, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(out, ref_out, atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match="residual"):
        gpu_kernels.rms_norm(parts, w, 1e-6)
    # Which projections split: by the row bound; never one with a bias or an odd K.
    table = [(8, {"qkv": 2, "o": 4}), (128, {"o": 2})]
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(gpu_kernels, "DECODE_SPLIT_K", table)
        assert gpu_kernels.decode_split_k("qkv", 1, weight, None) == 2
        assert gpu_kernels.decode_split_k("o", 8, weight, None) == 4
        assert gpu_kernels.decode_split_k("qkv", 16, weight, None) == 1
        assert gpu_kernels.decode_split_k("o", 128, weight, None) == 2
        assert gpu_kernels.decode_split_k("o", 129, weight, None) == 1
        assert gpu_kernels.decode_split_k("qkv", 1, weight, torch.zeros(40)) == 1
        assert gpu_kernels.decode_split_k("o", 1, torch.randn(40, 66), None) == 1


@pytest.mark.parametrize("rows", [3, 130])
def test_skinny_products_match_torch(rows: int) -> None:
    """40 output columns (a partial tile of 32), and past 128 rows a second program of rows:
    the plain product, split-K partials, and gate_up with SiLU-and-mul."""
    torch.manual_seed(6)
    tiling = gpu_kernels.GemmTiling(32, 32, 4, 2)
    x, weight = torch.randn(rows, 192), torch.randn(80, 192) / 8
    ref = x @ weight.T
    torch.testing.assert_close(gpu_kernels.skinny_linear(x, weight, tiling), ref, atol=1e-4, rtol=1e-4)
    parts = gpu_kernels.skinny_linear(x, weight, tiling._replace(parts=3))
    torch.testing.assert_close(parts, gpu_kernels.split_k_linear(x, weight, 3), atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(parts.sum(0), ref, atol=1e-4, rtol=1e-4)
    out = gpu_kernels.gate_up_silu(x, weight, tiling)
    torch.testing.assert_close(out, gpu_kernels.silu_mul(ref), atol=1e-4, rtol=1e-4)
    rows16 = gpu_kernels.GemmTiling(32, 32, 4, 2, block_m=16)  # programs of 16 rows
    torch.testing.assert_close(gpu_kernels.gate_up_silu(x, weight, rows16), out, atol=1e-4, rtol=1e-4)


def test_decode_triton_tiling_by_rows() -> None:
    tiling = gpu_kernels.GemmTiling(32, 32, 4, 2)
    weight = torch.randn(80, 64)
    with pytest.MonkeyPatch.context() as mp:
        # These small weights' grids fill no GPU's SMs; the SM guard is checked below on its own.
        mp.setattr(gpu_kernels, "_sm_count", lambda device: None)
        mp.setattr(gpu_kernels, "DECODE_TRITON", [(8, {"gate_up": tiling, "o": tiling}), (32, {"o": tiling})])
        assert gpu_kernels.decode_triton("gate_up", 8, weight) == tiling._replace(parts=1)
        assert gpu_kernels.decode_triton("gate_up", 9, weight) is None  # cuBLAS at this bound
        assert gpu_kernels.decode_triton("o", 32, weight, parts=2) == tiling._replace(parts=2)
        assert gpu_kernels.decode_triton("o", 32, weight, parts=4) is None  # K / parts not a multiple of 32
        # A tiling's own K slices stand over DECODE_SPLIT_K's; gate_up's are always one.
        mp.setattr(gpu_kernels, "DECODE_TRITON", [(8, {"gate_up": tiling._replace(parts=2), "o": tiling._replace(parts=2)})])
        assert gpu_kernels.decode_triton("o", 1, weight, parts=1) == tiling._replace(parts=2)
        assert gpu_kernels.decode_triton("gate_up", 1, weight) == tiling._replace(parts=1)
        assert gpu_kernels.decode_triton("o", 33, weight) is None  # past every bound
        assert gpu_kernels.decode_triton("gate_up", 1, torch.randn(80, 48)) is None
        # On a GPU, only where the grid fills 90% of its SMs: 132 SMs need 119 programs.
        mp.setattr(gpu_kernels, "_sm_count", lambda device: 132)
        wide = gpu_kernels.GemmTiling(64, 32, 4, 2)
        mp.setattr(gpu_kernels, "DECODE_TRITON", [(128, {"gate_up": wide, "o": wide})])
        assert gpu_kernels.decode_triton("gate_up", 1, torch.randn(2 * 8192, 64)) == wide._replace(parts=1)  # 128 programs
        assert gpu_kernels.decode_triton("gate_up", 1, torch.randn(2 * 3072, 64)) is None  # 48
        assert gpu_kernels.decode_triton("gate_up", 128, torch.randn(2 * 3072, 64)) is None  # one row tile
        o = torch.randn(2048, 256)
        assert gpu_kernels.decode_triton("o", 1, o, parts=4) == wide._replace(parts=4)  # 32 column tiles x 4 K slices
        assert gpu_kernels.decode_triton("o", 1, o, parts=2) is None  # 64


def test_rope_decode_attention_reads_split_k_partials() -> None:
    torch.manual_seed(5)
    heads, kv_heads, head_dim, page = 8, 2, 32, 4
    x, weight = torch.randn(2, 48), torch.randn((heads + 2 * kv_heads) * head_dim, 48)
    positions, slots = torch.tensor([5, 0]), torch.tensor([6 * page + 1, 2 * page])
    tables = torch.tensor([[3, 6], [2, 0]], dtype=torch.int32)
    lens = torch.tensor([6, 1], dtype=torch.int32)
    freqs = torch.arange(16).float()[:, None] * (1.0 / 10000 ** (torch.arange(0, head_dim, 2).float() / head_dim))
    emb = torch.cat([freqs, freqs], -1)
    caches = [(torch.randn(8, page, kv_heads, head_dim), torch.randn(8, page, kv_heads, head_dim))]
    caches.append((caches[0][0].clone(), caches[0][1].clone()))
    whole = gpu_kernels.rope_decode_attention(x @ weight.T, positions, emb.cos(), emb.sin(), heads, *caches[0],
                                              slots, tables, lens, 0.2)
    split = gpu_kernels.rope_decode_attention(gpu_kernels.split_k_linear(x, weight, 3), positions, emb.cos(), emb.sin(),
                                              heads, *caches[1], slots, tables, lens, 0.2)
    torch.testing.assert_close(split, whole, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(caches[1][0], caches[0][0], atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(caches[1][1], caches[0][1], atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("heads,kv_heads", [(8, 2), (6, 2), (4, 4)])
def test_paged_prefill_attention_matches_sdpa_on_a_mixed_step(heads: int, kv_heads: int) -> None:
    """Prefill chunks after cached prefixes, whole prompts and decodes in one step, over
    scattered blocks: the varlen Triton kernel against the gather-then-SDPA backend, with the
    default tiling and with tiles small enough that each chunk spans several."""
    torch.manual_seed(2)
    head_dim, page = 16, 4
    seqs = [
        SeqSlice(0, 13, [9, 3, 14, 0]),  # a whole prompt
        SeqSlice(9, 1, [5, 11, 2]),  # a decode
        SeqSlice(6, 10, [7, 1, 12, 4]),  # a chunk after a cached prefix
        SeqSlice(0, 1, [8]),  # a one-token prompt
        SeqSlice(3, 2, [6, 13]),
    ]
    k_cache = torch.randn(16, page, kv_heads, head_dim)
    v_cache = torch.randn(16, page, kv_heads, head_dim)
    tokens = sum(s.num_new for s in seqs)
    q = torch.randn(tokens, heads, head_dim)
    k, v = torch.randn(tokens, kv_heads, head_dim), torch.randn(tokens, kv_heads, head_dim)
    sdpa, triton_backend = SdpaPagedAttention(), TritonPagedAttention()
    ref = sdpa.forward(q, k, v, k_cache.clone(), v_cache.clone(), sdpa.build_metadata(seqs, page, DEV), 0.3)
    meta = triton_backend.build_metadata(seqs, page, DEV)
    assert meta.query_starts is not None and meta.query_starts.tolist() == [0, 13, 14, 24, 25, 27]
    kc, vc = k_cache.clone(), v_cache.clone()
    torch.testing.assert_close(triton_backend.forward(q, k, v, kc, vc, meta, 0.3), ref, atol=1e-4, rtol=1e-4)
    assert meta.seq_lens is not None
    small = gpu_kernels.paged_prefill_attention(q, kc, vc, meta.block_tables, meta.seq_lens, meta.query_starts, 0.3, rows=16)
    torch.testing.assert_close(small, ref, atol=1e-4, rtol=1e-4)


@pytest.mark.skipif(not CUDA, reason="counts compiled variants: a real compile")
def test_prefill_steps_of_any_batch_and_table_width_share_one_compiled_kernel() -> None:
    """The sequence count and the block table's width change every step; a variant compiled
    per value class would stall serving on first sight of each (as the KVBM copy kernel did)."""
    kernel = gpu_kernels.kernels().paged_prefill
    k_cache, v_cache = torch.randn(40, 4, 2, 16), torch.randn(40, 4, 2, 16)
    backend = TritonPagedAttention()

    def variants() -> int:
        return sum(len(cache[0]) for cache in kernel.device_caches.values())

    counts = []
    for seqs in ([SeqSlice(0, 5, [1, 2])], [SeqSlice(3, 13, list(range(3, 19)))],
                 [SeqSlice(0, 9, [20, 21, 22]), SeqSlice(4, 1, [23, 24]), SeqSlice(0, 2, [25])]):
        meta = backend.build_metadata(seqs, 4, DEV)
        tokens = sum(s.num_new for s in seqs)
        q, kv = torch.randn(tokens, 8, 16), torch.randn(tokens, 2, 16)
        backend.forward(q, kv, kv, k_cache, v_cache, meta, 0.25)
        counts.append(variants())
    assert counts[0] >= 1 and counts == [counts[0]] * 3


def test_store_kv_skips_padded_slots() -> None:
    k_cache, v_cache = torch.zeros(3, 2, 2, 4), torch.zeros(3, 2, 2, 4)
    kv = torch.randn(3, 16)  # rows of a wider qkv buffer: k and v are strided views
    k, v = kv[:, :8].view(3, 2, 4), kv[:, 8:].view(3, 2, 4)
    gpu_kernels.store_kv(k, v, k_cache, v_cache, torch.tensor([5, -1, 0]))
    flat_k, flat_v = k_cache.view(6, 2, 4), v_cache.view(6, 2, 4)
    torch.testing.assert_close(flat_k[5], k[0])
    torch.testing.assert_close(flat_v[0], v[2])
    assert flat_k[1:5].abs().sum() == 0


def test_fused_elementwise_kernels_match_torch() -> None:
    torch.manual_seed(1)
    x, res, w = torch.randn(3, 48), torch.randn(3, 48), torch.randn(48)
    h = x + res
    ref = w * (h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + 1e-6))
    out, new_res = gpu_kernels.rms_norm(x, w, 1e-6, res)
    torch.testing.assert_close(out, ref)
    torch.testing.assert_close(new_res, h)
    gate_up = torch.randn(3, 40)
    torch.testing.assert_close(gpu_kernels.silu_mul(gate_up), torch.nn.functional.silu(gate_up[:, :20]) * gate_up[:, 20:])
    # RoPE over 3 q/k heads of a row that also holds a v head
    head_dim, positions = 8, torch.tensor([0, 5, 17])
    freqs = torch.arange(32).float()[:, None] * (1.0 / 10000 ** (torch.arange(0, head_dim, 2).float() / head_dim))
    emb = torch.cat([freqs, freqs], -1)
    qkv = torch.randn(3, 4 * head_dim)
    expected = qkv.clone()
    x3 = qkv[:, : 3 * head_dim].view(3, 3, head_dim)
    rot = torch.cat([-x3[..., 4:], x3[..., :4]], -1)
    expected[:, : 3 * head_dim] = (x3 * emb.cos()[positions][:, None] + rot * emb.sin()[positions][:, None]).reshape(3, -1)
    before = qkv.clone()
    # 2 q, 1 k, 1 v head: q rotated in place, rotated k and v into cache slots, slot -1 skipped.
    k_cache, v_cache = torch.zeros(4, 2, 1, head_dim), torch.zeros(4, 2, 1, head_dim)
    gpu_kernels.rope_store_kv(qkv, positions, emb.cos(), emb.sin(), 2, 1, head_dim,
                              k_cache, v_cache, torch.tensor([7, -1, 2]))
    torch.testing.assert_close(qkv[:, : 2 * head_dim], expected[:, : 2 * head_dim])
    flat_k, flat_v = k_cache.view(8, head_dim), v_cache.view(8, head_dim)
    torch.testing.assert_close(flat_k[7], expected[0, 2 * head_dim : 3 * head_dim])
    torch.testing.assert_close(flat_k[2], expected[2, 2 * head_dim : 3 * head_dim])
    torch.testing.assert_close(flat_v[2], before[2, 3 * head_dim :])
    assert flat_k[[0, 1, 3, 4, 5, 6]].abs().sum() == 0 and flat_v[[0, 1, 3, 4, 5, 6]].abs().sum() == 0


def _triton_model(model_dir: Path) -> tuple[LlamaForCausalLM, LlamaForCausalLM]:
    config = load_model_config(model_dir)
    plain = load_model(config, torch.float32, CPU).to(DEV)
    plain.rotary.build(DEV)
    fused = LlamaForCausalLM(config, TritonPagedAttention())
    fused.load_state_dict(plain.state_dict())
    fused.rotary.build(DEV)
    assert fused.fused and not plain.fused
    return plain.eval(), fused.eval()


@pytest.mark.parametrize("shape", ["llama-gqa", "qwen2-bias", "qwen3-qknorm", "llama-mha-tied"])
@pytest.mark.parametrize("decode_variants", [False, True])
def test_fused_forward_matches_plain(shape: str, decode_variants: bool, model_dirs: Callable[[str], Path],
                                     monkeypatch: pytest.MonkeyPatch) -> None:
    """decode_variants: the decode step's qkv, o and down projections as split-K partials, summed
    by their consumers (a projection with a bias stays whole), through the Triton skinny kernel for
    qkv, o and down (with K slices of their own), and its gate_up product and SiLU as one kernel
    (gpu_kernels.gate_up_silu)."""
    if decode_variants:
        monkeypatch.setattr(gpu_kernels, "DECODE_SPLIT_K", [(4, {"qkv": 2, "o": 4, "down": 2}), (256, {"o": 2, "down": 4})])
        tiling = gpu_kernels.GemmTiling(16, 16, 4, 2)
        # o at DECODE_SPLIT_K's 4 slices, down at 4 of its own (not 2), qkv whole (not 2).
        monkeypatch.setattr(gpu_kernels, "DECODE_TRITON", [(4, {"gate_up": tiling, "o": tiling,
                                                                "down": tiling._replace(parts=4),
                                                                "qkv": tiling._replace(parts=1)})])
    plain, fused = _triton_model(model_dirs(shape))
    config = plain.config
    ids = [(5 * i + 1) % config.vocab_size for i in range(13)]
    blocks = [6, 1, 4, 0]
    with torch.no_grad():
        ref_kv = KVCache.allocate(config, 8, 4, torch.float32, DEV)
        meta = SdpaPagedAttention().build_metadata([SeqSlice(0, 13, blocks)], 4, DEV)
        ref = plain.compute_logits(plain(torch.tensor(ids), torch.arange(13), ref_kv, meta))
        kv = KVCache.allocate(config, 8, 4, torch.float32, DEV)
        backend = fused.model.layers[0].self_attn.backend
        # Prefill 7 tokens, then 5 after them (the varlen kernel, one without and one with a
        # cached prefix), then decode the 13th (the decode kernel).
        logits = []
        for start, end in ((0, 7), (7, 12), (12, 13)):
            meta = backend.build_metadata([SeqSlice(start, end - start, blocks)], 4, DEV)
            assert (meta.query_starts is None) == (end - start == 1)
            hidden = fused(torch.tensor(ids[start:end]), torch.arange(start, end), kv, meta)
            logits.append(fused.compute_logits(hidden))
    torch.testing.assert_close(torch.cat(logits), ref, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("use_graphs", [False, True] if CUDA else [False])
def test_padded_graph_decode_matches_eager_steps(use_graphs: bool, model_dirs: Callable[[str], Path]) -> None:
    _, fused = _triton_model(model_dirs("llama-gqa"))
    config = fused.config
    prompts = [[3, 4, 5, 6, 7], [9, 10], [20, 21, 22, 23, 24, 25, 26]]
    tables = [[0, 1, 2, 3], [4, 5, 6], [7, 8, 9, 10]]
    greedy = SampleRow(SamplingParams(), None)

    def generate(runner: ModelRunner, steps: int) -> list[list[int]]:
        tokens = [list(p) for p in prompts]
        flat = [t for p in prompts for t in p]
        positions = [i for p in prompts for i in range(len(p))]
        slices = [SeqSlice(0, len(p), t) for p, t in zip(prompts, tables)]
        ends = list(torch.tensor([len(p) for p in prompts]).cumsum(0) - 1)
        out = runner.execute(StepInput(flat, positions, slices, [int(e) for e in ends], [greedy] * 3))
        for _ in range(steps):
            for seq, tok in zip(tokens, out.token_ids):
                seq.append(tok)
            slices = [SeqSlice(len(s) - 1, 1, t) for s, t in zip(tokens, tables)]
            out = runner.execute(
                StepInput([s[-1] for s in tokens], [len(s) - 1 for s in tokens], slices, [0, 1, 2], [greedy] * 3)
            )
        return tokens

    eager = ModelRunner(fused, KVCache.allocate(config, 16, 4, torch.float32, DEV), DEV)
    expected = generate(eager, 6)
    padded = ModelRunner(fused, KVCache.allocate(config, 16, 4, torch.float32, DEV), DEV)
    # Bucket 4 for 3 sequences: one padded row that must neither write nor disturb the others.
    padded.graphs = DecodeGraphs(fused, padded.kv, DEV, [1, 4], max_blocks_per_seq=8, use_graphs=use_graphs)
    padded.graphs.capture()
    assert generate(padded, 6) == expected


def test_embed_reads_placeholders_from_feedback() -> None:
    weight = torch.randn(10, 24)
    feedback = torch.tensor([7, 2, 9])
    ids = torch.tensor([3, -1, 0, -3, -2])
    torch.testing.assert_close(gpu_kernels.embed(ids, feedback, weight), weight[torch.tensor([3, 7, 0, 9, 2])])


@pytest.mark.parametrize("use_graphs", [False, True] if CUDA else [False])
def test_overlapped_decode_reads_placeholders_like_eager_steps(use_graphs: bool, model_dirs: Callable[[str], Path]) -> None:
    """Each step launched before the previous one's tokens are read (its inputs placeholders for
    them, read on the device) gives the plain loop's tokens, on the padded graph path and eagerly."""
    _, fused = _triton_model(model_dirs("llama-gqa"))
    config = fused.config
    prompts = [[3, 4, 5, 6, 7], [9, 10], [20, 21, 22, 23, 24, 25, 26]]
    tables = [[0, 1, 2, 3], [4, 5, 6], [7, 8, 9, 10]]
    greedy = [SampleRow(SamplingParams(), None)] * 3

    def generate(runner: ModelRunner, steps: int, overlapped: bool) -> list[list[int]]:
        tokens = [list(p) for p in prompts]
        flat = [t for p in prompts for t in p]
        positions = [i for p in prompts for i in range(len(p))]
        slices = [SeqSlice(0, len(p), t) for p, t in zip(prompts, tables)]
        ends = [int(e) for e in torch.tensor([len(p) for p in prompts]).cumsum(0) - 1]
        launched = runner.launch(StepInput(flat, positions, slices, ends, greedy))
        for _ in range(steps):
            if overlapped:  # the token in flight sits at position len(s)
                ids, pos = [-1, -2, -3], [len(s) for s in tokens]
                nxt = runner.launch(StepInput(ids, pos, [SeqSlice(p, 1, t) for p, t in zip(pos, tables)], [0, 1, 2], greedy))
            for seq, tok in zip(tokens, runner.collect(launched).token_ids):
                seq.append(tok)
            if not overlapped:
                pos = [len(s) - 1 for s in tokens]
                nxt = runner.launch(StepInput([s[-1] for s in tokens], pos, [SeqSlice(p, 1, t) for p, t in zip(pos, tables)], [0, 1, 2], greedy))
            launched = nxt
        for seq, tok in zip(tokens, runner.collect(launched).token_ids):
            seq.append(tok)
        return tokens

    eager = ModelRunner(fused, KVCache.allocate(config, 16, 4, torch.float32, DEV), DEV, max_num_seqs=4)
    expected = generate(eager, 5, overlapped=False)
    assert generate(eager, 5, overlapped=True) == expected
    padded = ModelRunner(fused, KVCache.allocate(config, 16, 4, torch.float32, DEV), DEV, max_num_seqs=4)
    padded.graphs = DecodeGraphs(fused, padded.kv, DEV, [1, 4], max_blocks_per_seq=8, use_graphs=use_graphs,
                                 feedback=padded.feedback)
    padded.graphs.capture()
    assert generate(padded, 5, overlapped=True) == expected



@pytest.mark.parametrize("use_graphs", [False, True] if CUDA else [False])
def test_padded_prefill_graph_steps_match_eager_steps(use_graphs: bool, model_dirs: Callable[[str], Path]) -> None:
    """A step with prefill chunks through PrefillGraphs' padded static buffers (tokens padded
    to a bucket of 64, sequences to 4) gives the eager step's sampled logits and cache writes:
    two prompts, then a mixed step (one sequence decodes, the other's next chunk follows its
    cached prefix); padded tokens and sequences write and disturb nothing."""
    _, fused = _triton_model(model_dirs("llama-gqa"))
    config = fused.config
    backend = fused.model.layers[0].self_attn.backend
    tables = [[0, 1, 2, 3], [4, 5, 6, 7]]
    first = [list(range(3, 8)), list(range(10, 17))]  # 5 and 7 prompt tokens
    steps = [
        ([SeqSlice(0, 5, tables[0]), SeqSlice(0, 7, tables[1])], first[0] + first[1], [4, 11]),
        # seq 0 decodes token 5; seq 1's next 4 prompt tokens follow its 7 cached ones
        ([SeqSlice(5, 1, tables[0]), SeqSlice(7, 4, tables[1])], [9] + [20, 21, 22, 23], [0, 4]),
    ]
    eager_kv = KVCache.allocate(config, 8, 4, torch.float32, DEV)
    graph_kv = KVCache.allocate(config, 8, 4, torch.float32, DEV)
    graphs = PrefillGraphs(fused, graph_kv, DEV, max_tokens=64, max_seqs=4, max_blocks_per_seq=4, use_graphs=use_graphs)
    assert graphs.sizes == [64] and graphs.fits(12, 2) == 64 and graphs.fits(65, 2) is None and graphs.fits(8, 5) is None
    graphs.capture()
    with torch.no_grad():
        for slices, ids, sample in steps:
            positions = [p for s in slices for p in range(s.num_computed, s.num_computed + s.num_new)]
            meta = backend.build_metadata(slices, 4, DEV)
            hidden = fused(torch.tensor(ids), torch.tensor(positions), eager_kv, meta)
            expected = fused.compute_logits(hidden[torch.tensor(sample)])
            got = graphs.run(ids, positions, slices, sample, graphs.fits(len(ids), len(slices)) or 0)
            torch.testing.assert_close(got, expected, atol=1e-4, rtol=1e-4)
            for cache_e, cache_g in zip((*eager_kv.k, *eager_kv.v), (*graph_kv.k, *graph_kv.v)):
                torch.testing.assert_close(cache_g, cache_e)
