"""`rlmt-jax plan`: per-device memory from the real shapes and shardings, checked against hand counts."""

from __future__ import annotations

import json

import pytest

from models import ModelConfig
from rlmt_jax.cli import main
from rlmt_jax.settings.config import resolve
from rlmt_jax.core.errors import UserError
from rlmt_jax.plans.memory_plan import GIB, DeviceSpec, LocalDims, attention_bytes, layer_activation_bytes, memory_plan

# Llama-3.1-8B by hand: embed and lm_head 128256 x 4096; per layer q and o 4096 x 4096, k and v 4096 x 1024,
# gate, up, down 4096 x 14336, two norms of 4096; 32 layers; a final norm.
LLAMA_TABLE = 128256 * 4096
LLAMA_LAYER = 2 * 4096 * 4096 + 2 * 4096 * 1024 + 3 * 4096 * 14336 + 2 * 4096
LLAMA_PARAMS = 2 * LLAMA_TABLE + 32 * LLAMA_LAYER + 4096
LLAMA_VECTORS = 32 * 2 * 4096 + 4096  # norm scales: replicated by the rules, every other param split on embed
# Skywork RM: the Llama body, a 128257-row table (its [PAD] row), a score head 4096 x 1, no lm_head.
SKYWORK_PARAMS = 128257 * 4096 + 32 * LLAMA_LAYER + 4096 + 4096
# AdamW's scalars: count, 6 injected hyperparameters (float32), the schedule's count, clipping's count.
OPTIMIZER_SCALAR_BYTES = 9 * 4


def per_device_f32(total: int, vectors: int, fsdp: int) -> int:
    """float32 bytes per device when everything but the vectors is split `fsdp` ways."""
    assert (total - vectors) % fsdp == 0
    return (total - vectors) // fsdp * 4 + vectors * 4


@pytest.fixture(scope="module")
def grpo_v5p():
    cfg = resolve("grpo_llama31_8b_instruct")
    return memory_plan(cfg, DeviceSpec.parse("v5p-64"))


@pytest.fixture(scope="module")
def grpo_h100():
    # the overrides the config's comment gives for one 8xH100 host
    cfg = resolve("grpo_llama31_8b_instruct", ["mesh.fsdp=8", "optimizer.micro_batch_size=8", "reward.batch_size=8"])
    return memory_plan(cfg, DeviceSpec.parse("h100"))


def test_hand_counts_match_the_published_8b_sizes():
    assert LLAMA_PARAMS == 8_030_261_248
    assert SKYWORK_PARAMS == 7_504_932_864


def test_v5p_64_is_32_chips_all_fsdp(grpo_v5p):
    assert grpo_v5p.device == DeviceSpec("v5p", 32, 95 * GIB, 1)
    assert grpo_v5p.mesh_shape == {"data": 1, "fsdp": 32, "tensor": 1}
    assert [m.num_params for m in grpo_v5p.models] == [LLAMA_PARAMS, LLAMA_PARAMS, SKYWORK_PARAMS]


def test_llama_grpo_on_v5p_64_param_and_optimizer_bytes_are_the_exact_products(grpo_v5p):
    params = per_device_f32(LLAMA_PARAMS, LLAMA_VECTORS, 32)
    assert params == 1_004_814_336
    assert grpo_v5p.item("policy params").bytes == params
    assert grpo_v5p.item("reference params").bytes == params // 2  # frozen: stored in bfloat16
    assert grpo_v5p.item("optimizer state").bytes == 2 * params + OPTIMIZER_SCALAR_BYTES
    assert grpo_v5p.item("gradients").bytes == params
    assert grpo_v5p.item("reward model params").bytes == per_device_f32(SKYWORK_PARAMS, LLAMA_VECTORS, 32) // 2


def test_llama_grpo_on_8xh100_param_and_optimizer_bytes_are_the_exact_products(grpo_h100):
    assert grpo_h100.mesh_shape == {"data": 1, "fsdp": 8, "tensor": 1}
    params = per_device_f32(LLAMA_PARAMS, LLAMA_VECTORS, 8)
    assert params == 4_016_062_464
    assert grpo_h100.item("policy params").bytes == params
    assert grpo_h100.item("optimizer state").bytes == 2 * params + OPTIMIZER_SCALAR_BYTES
    assert grpo_h100.item("reward model params").bytes == per_device_f32(SKYWORK_PARAMS, LLAMA_VECTORS, 8) // 2


def test_kv_cache_is_every_rollout_row_split_over_the_devices(grpo_v5p, grpo_h100):
    # 64 prompts x 8 samples, 1024 + 4096 - 1 slots, 32 layers, 8 kv heads of 128, bfloat16 k and v,
    # a bool valid mask; plus the 64 prompts' own cache (1024 slots) while it is copied to the samples.
    # The decode layout (rollout.mesh tensor 4) splits rows over data = devices / 4 and kv heads 4 ways; the
    # valid mask over data only.
    def cache(rows, slots):
        return 2 * 32 * rows * slots * 8 * 128 * 2 // 4 + rows * slots

    assert grpo_v5p.item("KV cache").bytes == cache(512 // 8, 5119) + cache(64 // 8, 1024)
    assert grpo_h100.item("KV cache").bytes == cache(512 // 2, 5119) + cache(64 // 2, 1024)
    training = memory_plan(resolve("grpo_llama31_8b_instruct", ["rollout.mesh.reshard=false"]),
                           DeviceSpec.parse("v5p-64"))  # the training layout: rows over the 32 fsdp devices
    assert training.item("KV cache").bytes == 2 * 32 * 16 * 5119 * 8 * 128 * 2 + 16 * 5119 + (
        2 * 32 * 2 * 1024 * 8 * 128 * 2 + 2 * 1024)


def test_decode_weight_copies_are_the_fused_kernels_and_the_head_in_the_compute_dtype(grpo_h100):
    # sampling concatenates q, k, v and gate, up per layer and transposes the lm head, in bfloat16, split 4 ways
    # (the decode layout's tensor groups)
    per_layer = 4096 * 4096 + 2 * 4096 * 1024 + 2 * 4096 * 14336
    assert grpo_h100.item("decode weight copies").bytes == (32 * per_layer + LLAMA_TABLE) * 2 // 4
    assert grpo_h100.item("decode weight copies").phase == "rollout"


def test_h100_peak_is_the_rollout_and_the_kv_cache_is_the_largest_item(grpo_h100):
    assert grpo_h100.peak_phase == "rollout"
    assert grpo_h100.largest.name == "KV cache"
    assert grpo_h100.peak_bytes == grpo_h100.resident_bytes + grpo_h100.phase_bytes()["rollout"]
    assert grpo_h100.fits  # about 66 of 80 GiB with the rollout copy (tensor 4: a quarter of the policy)
    assert 65 * GIB < grpo_h100.peak_bytes < 68 * GIB


def test_reward_batch_of_8_on_32_devices_is_not_split_and_the_plan_says_so(grpo_v5p):
    # 8 rows cannot split 32 ways: every device runs all 8 at the 8192 bucket (1024 + 4096 tokens fit no less);
    # with today's xla attention its [T, T] probabilities do not fit, with splash (auto on TPU) they are gone
    unsplit, kernel = (memory_plan(resolve("grpo_llama31_8b_instruct", ["reward.batch_size=8", *attention]),
                                   DeviceSpec.parse("v5p-64")) for attention in (["runtime.attention=xla"], []))
    assert unsplit.shapes["reward_rows"] == 8 and unsplit.shapes["reward_seq"] == 8192
    assert unsplit.largest.name == "reward forward"
    assert not unsplit.fits
    assert any(note.startswith("reward.batch_size: 8 reward-model rows") for note in unsplit.notes)
    assert kernel.attention == "splash" and kernel.fits and kernel.notes == unsplit.notes
    assert kernel.item("reward forward").bytes < unsplit.item("reward forward").bytes / 8  # 13.0 vs 108.2 GiB
    # the shipped config scores 32 rows per call: one per chip
    assert grpo_v5p.shapes["reward_rows"] == 32
    assert grpo_v5p.fits and not grpo_v5p.notes


def test_activation_formula_on_a_hand_computed_layer():
    dims = LocalDims(rows=1, embed=4, heads=2, kv_heads=1, head_dim=2, mlp=8, vocab=16, layers=3)
    # none: 1*2*4*(4*2+8) + 1*2*(2+2)*2*2 + 1*2*2*2*(4+2) + 1*2*2*2*2 + 1*2*8*4*2 = 128 + 32 + 48 + 16 + 128
    # dots: 1*2*(3*4 + (2+2)*2 + 2*8)*2 = 144;  full: 1*2*4*2 = 16
    assert layer_activation_bytes(dims, seq=2, act=2) == {"none": 352, "dots": 144, "full": 16}


def test_attention_memory_per_implementation_on_a_hand_computed_layer():
    # B=2 rows, T=200 tokens, H=4 heads, K=2 kv heads, Dh=8, bfloat16 (b=2)
    dims = LocalDims(rows=2, embed=32, heads=4, kv_heads=2, head_dim=8, mlp=64, vocab=16, layers=3)
    xla = 2 * 4 * 200 * 200 * (4 + 2)  # probabilities in float32 and bfloat16: 1,920,000
    cudnn = 2 * 4 * 200 * 4 + 2 * 200 * (4 + 2 * 2) * 8 * 2  # logsumexp + rotated q, k, v: 6,400 + 51,200
    splash = 2 * 4 * 256 * 4 + 2 * 256 * (4 + 2 * 2) * 8 * 2  # the same at 256 (200 padded to 128s): 73,728
    assert (xla, cudnn, splash) == (1_920_000, 57_600, 73_728)
    assert [attention_bytes(dims, 200, 2, name) for name in ("xla", "cudnn", "splash")] == [xla, cudnn, splash]
    none = {name: layer_activation_bytes(dims, 200, 2, name)["none"] for name in ("xla", "cudnn", "splash")}
    assert none["xla"] - none["cudnn"] == xla - cudnn and none["xla"] - none["splash"] == xla - splash


def test_the_plan_names_the_attention_auto_picks_per_device_and_counts_it(grpo_v5p, grpo_h100):
    assert (grpo_v5p.attention, grpo_h100.attention) == ("splash", "cudnn")
    # one micro-batch row per device (v5p: 32 sequences / 32) of 5120 tokens, 32 heads, 8 kv heads of 128
    assert grpo_v5p.attention_by_implementation == {
        "xla": 32 * 5120 * 5120 * 6, "splash": 32 * 5120 * 4 + 5120 * 48 * 128 * 2,
        "cudnn": 32 * 5120 * 4 + 5120 * 48 * 128 * 2}
    xla = memory_plan(resolve("grpo_llama31_8b_instruct", ["runtime.attention=xla"]), DeviceSpec.parse("v5p-64"))
    assert xla.attention == "xla"
    assert grpo_v5p.activations_by_remat["none"] < xla.activations_by_remat["none"]
    assert grpo_v5p.activations_by_remat["full"] == xla.activations_by_remat["full"] - (
        32 * 5120 * 5120 * 6 - grpo_v5p.attention_by_implementation["splash"]) - (5120 * 5120 - 5120)


def test_remat_full_keeps_less_than_dots_less_than_none(grpo_v5p):
    by_remat = grpo_v5p.activations_by_remat
    assert by_remat["full"] < by_remat["dots"] < by_remat["none"]
    assert grpo_v5p.item("activations (remat=full)").bytes == by_remat["full"]


def test_tensor_parallel_splits_heads_and_replicates_what_does_not_divide(tmp_path):
    # tiny model: vocab 96, embed 64, 4 heads of 16, 2 kv heads, mlp 128, 1 layer, untied; mesh fsdp=2 x tensor=4
    policy = tmp_path / "policy"
    policy.mkdir()
    config = ModelConfig(vocab_size=96, hidden_size=64, intermediate_size=128, num_hidden_layers=1,
                         num_attention_heads=4, num_key_value_heads=2).to_hf_config()
    (policy / "config.json").write_text(json.dumps(config))
    cfg = resolve("tiny", [f"model.policy={policy}", "algorithm.name=sft", "algorithm.sft.batch_size=8",
                           "optimizer.micro_batch_size=8", "mesh.fsdp=2", "mesh.tensor=4",
                           "runtime.scan_layers=false", "data.epochs=1"])
    plan = memory_plan(cfg, DeviceSpec.parse("cpu", devices=8))
    # embed [96, 64]: vocab/4, embed/2; lm_head same; q [64, 4, 16] and o [4, 16, 64]: /8; k, v [64, 2, 16]:
    # 2 kv heads do not split 4 ways, embed/2; gate, up, down: /8; three norm vectors of 64 replicated.
    floats = 2 * 96 * 64 // 8 + 2 * 64 * 64 // 8 + 2 * 64 * 32 // 2 + 3 * 64 * 128 // 8 + 3 * 64
    assert plan.item("policy params").bytes == floats * 4
    assert plan.models[0].num_params == 2 * 96 * 64 + 2 * 64 * 64 + 2 * 64 * 32 + 3 * 64 * 128 + 3 * 64
    assert [item.name for item in plan.items] == [
        "policy params", "optimizer state", "gradients", "activations (remat=none)", "logits chunk"]


def test_tiny_default_config_fits_one_cpu():
    plan = memory_plan(resolve(None), DeviceSpec.parse("cpu"))
    assert plan.mesh_shape == {"data": 1, "fsdp": 1, "tensor": 1}
    assert plan.fits
    assert plan.item("policy params").bytes == plan.models[0].global_bytes  # one device holds it all


def test_cli_prints_the_table_for_v5p_64_and_8xh100(capsys):
    assert main(["plan", "grpo_llama31_8b_instruct", "--device-kind", "v5p-64"]) == 0
    v5p = capsys.readouterr().out
    assert "devices: 32 x v5p, 95.00 GiB each; mesh data=1 x fsdp=32 x tensor=1" in v5p
    assert "policy params                      resident           0.94" in v5p
    assert "largest item: KV cache" in v5p and ": fits" in v5p
    assert "attention: splash on v5p; one layer keeps, per micro-batch: xla 4.69 GiB | splash 0.06 GiB" in v5p

    assert main(["plan", "grpo_llama31_8b_instruct", "mesh.fsdp=8", "optimizer.micro_batch_size=8",
                 "reward.batch_size=8", "--device-kind", "h100", "--json"]) == 0
    h100 = json.loads(capsys.readouterr().out)
    assert h100["mesh"] == {"data": 1, "fsdp": 8, "tensor": 1}
    assert h100["fits"] is True and h100["largest"] == "KV cache"
    assert h100["items"][0] == {
        "name": "policy params", "phase": "resident", "bytes": 4_016_062_464,
        "how": "8,030,261,248 params x 4 B (float32) = 29.92 GiB, split by the rules"}


@pytest.mark.parametrize(
    ("kind", "devices", "slices", "expected"),
    [("v5p-64", None, 1, 32), ("v5e-64", None, 1, 64), ("v4-32", None, 1, 16), ("v5p-64", None, 2, 64),
     ("h100", None, 1, 8), ("v5p", 16, 1, 16), ("cpu", None, 1, 1)],
)
def test_device_counts_follow_the_slice_names(kind, devices, slices, expected):
    assert DeviceSpec.parse(kind, devices, slices).count == expected


@pytest.mark.parametrize(
    ("kind", "devices", "message"),
    [("v5p", None, "--device-kind v5p needs --devices N"),
     ("v5p-64", 64, "--devices 64 contradicts --device-kind v5p-64"),
     ("tpu9", None, "--device-kind 'tpu9': expected one of")],
)
def test_bad_device_settings_name_the_option(kind, devices, message):
    with pytest.raises(UserError, match=message):
        DeviceSpec.parse(kind, devices)


def test_a_model_path_without_config_json_that_is_not_a_known_model_names_the_key(tmp_path):
    cfg = resolve("grpo_llama31_8b_sft_warmstart")
    with pytest.raises(UserError, match="config key 'model.policy' \\(runs/sft_llama31_8b_warmstart/export\\): "
                                        "no config.json there"):
        memory_plan(cfg, DeviceSpec.parse("h100"))


# ------------------------------------------------------------------------------------ the time plan
H100_OVERRIDES = ["mesh.fsdp=8", "optimizer.micro_batch_size=8", "reward.batch_size=8"]


@pytest.mark.parametrize("device, overrides", [("h100", H100_OVERRIDES), ("v5p-64", [])])
def test_time_plan_of_the_recipe_has_finite_positive_phases_and_the_decode_layout_is_far_faster(device, overrides):
    import math

    from rlmt_jax.plans.time_plan import time_plan

    spec = DeviceSpec.parse(device)
    layout = time_plan(resolve("grpo_llama31_8b_instruct", overrides), spec)
    training = time_plan(resolve("grpo_llama31_8b_instruct", [*overrides, "rollout.mesh.reshard=false"]), spec)
    names = ["rollout copy", "rollout prefill", "rollout decode", "reward scoring", "old log-probs",
             "reference log-probs", "update"]
    assert [p.name for p in layout.phases] == names
    assert [p.name for p in training.phases] == [n for n in names if n != "rollout copy"]
    for phase in (*layout.phases, *training.phases):
        assert math.isfinite(phase.seconds) and phase.seconds > 0, phase
    decode, gathered = layout.phase("rollout decode"), training.phase("rollout decode")
    assert gathered.seconds > 4 * decode.seconds
    # FSDP gathers every layer's float32 kernels per token: ~ the layers' bytes x 7/8 (h100) or 31/32 per step
    fsdp = 8 if device == "h100" else 32
    layers_f32 = (LLAMA_PARAMS - 2 * LLAMA_TABLE - LLAMA_VECTORS) * 4
    assert gathered.link_bytes / 4096 == pytest.approx(layers_f32 * (fsdp - 1) / fsdp, rel=1e-6)
    # the decode layout (tensor 4) moves activations only: 2 all-reduces a layer of [rows per group, embed]
    rows = 512 // (spec.count // 4)
    assert decode.link_bytes / 4096 == pytest.approx(2 * 32 * rows * 4096 * 2 * 2 * 3 / 4)
    assert decode.link_bytes < gathered.link_bytes / 10
    assert layout.step_seconds < training.step_seconds
    assert layout.sequence_tokens == 64 * 8 * (1024 + 4096)
    assert layout.tokens_per_second_per_chip == pytest.approx(
        layout.sequence_tokens / layout.step_seconds / spec.count)


def test_plan_counts_the_rollout_copy_and_frozen_models_in_bfloat16(grpo_h100):
    # tensor 4 (the recipe's rollout.mesh): a quarter of every matrix, the vectors whole, in bfloat16
    copy = grpo_h100.item("rollout params copy")
    assert copy.phase == "rollout"
    assert copy.bytes == (LLAMA_PARAMS - LLAMA_VECTORS) // 4 * 2 + LLAMA_VECTORS * 2
    assert grpo_h100.item("reference params").bytes == per_device_f32(LLAMA_PARAMS, LLAMA_VECTORS, 8) // 2
    assert grpo_h100.item("reward model params").bytes == per_device_f32(SKYWORK_PARAMS, LLAMA_VECTORS, 8) // 2
    assert grpo_h100.fits


def test_new_device_kinds_parse():
    assert DeviceSpec.parse("v5litepod-16") == DeviceSpec("v5e", 16, 16 * GIB, 1)
    assert DeviceSpec.parse("v6e-8") == DeviceSpec("v6e", 8, 32 * GIB, 1)
    assert DeviceSpec.parse("a100") == DeviceSpec("a100", 8, 80 * GIB, 1)


def test_plan_cli_prints_the_time_plan(capsys):
    assert main(["plan", "grpo_llama31_8b_instruct", "--device-kind", "v5p-64"]) == 0
    out = capsys.readouterr().out
    assert "time per step" in out and "rollout decode" in out and "sequence tokens/s per chip" in out
    assert main(["plan", "grpo_llama31_8b_instruct", "--device-kind", "v6e-64", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["time"]["step_seconds"] > 0


def test_only_the_decode_step_reads_at_the_streamed_share_of_the_bandwidth():
    import dataclasses

    from rlmt_jax.plans.time_plan import CHIPS, time_plan

    cfg, spec = resolve("grpo_llama31_8b_instruct", H100_OVERRIDES), DeviceSpec.parse("h100")
    full = dataclasses.replace(CHIPS["h100"], stream=1.0)
    half = dataclasses.replace(CHIPS["h100"], stream=0.5)
    at_full, at_half = time_plan(cfg, spec, full), time_plan(cfg, spec, half)
    decode = at_full.phase("rollout decode")
    # the decode step is bound by its reads (weights + KV cache): at half the share its memory term doubles,
    # its link and latency terms stay
    memory = decode.hbm_bytes / full.hbm
    assert memory > decode.flops / full.flops
    assert at_half.phase("rollout decode").seconds == pytest.approx(decode.seconds + memory, rel=1e-9)
    for name in ("rollout copy", "rollout prefill", "reward scoring", "old log-probs", "update"):
        assert at_half.phase(name).seconds == at_full.phase(name).seconds, name
    assert CHIPS["h100"].stream == 0.8


def test_the_gpu_decode_kernel_reads_each_rows_slots_so_far_and_the_xla_path_its_windows():
    from rlmt_jax.rollout.sampling import SamplingConfig
    from rlmt_jax.plans.time_plan import time_plan

    spec = DeviceSpec.parse("h100")
    kernel = time_plan(resolve("grpo_llama31_8b_instruct", H100_OVERRIDES), spec).phase("rollout decode")
    xla = time_plan(resolve("grpo_llama31_8b_instruct", [*H100_OVERRIDES, "runtime.attention=xla"]), spec)
    xla = xla.phase("rollout decode")
    # xla: 4 windows (the last token needs no slot), window j reads the 1024 prompt slots and windows 0..j
    assert SamplingConfig(max_new_tokens=4096).response_blocks() == (1024, 1024, 1024, 1023)
    xla_keys = (1024 * (2048 + 3072 + 4096) + 1023 * (1024 + 4095)) / 4095
    kernel_keys = 1024 + 4097 / 2  # step t of 4096 reads slots up to prompt + t: 1024 + (1 + ... + 4096) / 4096
    kv_per_slot = 2 * 32 * 8 * 128 * 2  # layers x kv heads x head_dim, keys and values, bfloat16
    assert xla.hbm_bytes - kernel.hbm_bytes == pytest.approx(
        4096 * 512 * (xla_keys - kernel_keys) * kv_per_slot / 8, rel=1e-9)
    assert "~3072 cache slots" in kernel.how and "~3583 cache slots" in xla.how


# ------------------------------------------------------------------ the slot engine and response lengths
SLOTS = [*H100_OVERRIDES, "rollout.engine=slots", "rollout.slots=32"]  # the recipe's 32 slots per replica; 2 replicas (tensor 4 of 8)
LLAMA_MATMUL_PARAMS = LLAMA_PARAMS - LLAMA_TABLE - LLAMA_VECTORS  # every kernel and the lm head, not the embedding
KV_PER_SLOT = 2 * 32 * 8 * 128 * 2  # keys and values of one row at one slot, every layer, bfloat16


def h100_time(overrides, response_mean=None):
    from rlmt_jax.plans.time_plan import time_plan

    return time_plan(resolve("grpo_llama31_8b_instruct", overrides), DeviceSpec.parse("h100"),
                     response_mean=response_mean)


def test_default_response_mean_is_the_cap_and_gives_the_static_decode_of_every_row_at_the_cap():
    default, at_cap = h100_time(H100_OVERRIDES), h100_time(H100_OVERRIDES, response_mean=4096)
    assert default.response_mean == 4096.0 and default.engine == "static"
    # 4096 steps x 512 rows: the README's 49.6 s, unchanged since the plan had no length distribution
    assert default.phase("rollout decode").seconds == pytest.approx(49.62172408276697, rel=1e-12)
    assert at_cap.phases == default.phases
    assert default.decode_by_engine["static"] == default.phase("rollout decode")
    assert default.sampled_tokens == 512 * 4096 and default.sequence_tokens == 512 * (1024 + 4096)
    # static decodes every row until the step's longest stops (at the cap): the mean changes its decode not at all
    short = h100_time(H100_OVERRIDES, response_mean=1024)
    assert short.phase("rollout decode") == default.phase("rollout decode")
    assert short.sampled_tokens == 512 * 1024 and short.sequence_tokens == 512 * (1024 + 1024)


def test_slots_decode_a_quarter_length_mean_on_fewer_slots_than_rows_reads_far_less_than_static():
    plan = h100_time(SLOTS, response_mean=1024)
    static, slots = plan.decode_by_engine["static"], plan.decode_by_engine["slots"]
    assert plan.engine == "slots" and plan.phase("rollout decode") == slots
    # R = 512 rows / 2 replicas = 256 per replica > S = 32: ceil(256 x 1024 / 32) = 8192 steps (> the cap 4096),
    # each on 32 x 2 = 64 slots reading their prompt (1024) + the mean written response (1024) slots
    steps, rows, keys = 8192, 64, 1024 + 1024
    weights = LLAMA_MATMUL_PARAMS * 2 / 4  # the bfloat16 copy split over tensor 4
    assert slots.hbm_bytes == pytest.approx(steps * (weights + rows * keys * KV_PER_SLOT / 8), rel=1e-12)
    assert slots.how.startswith(
        "8192 steps = max(4096, ceil(256 rows x 1024 mean / 32 slots)) x 64 rows (32 slots x 2 replicas)")
    assert "~2048 cache slots" in slots.how
    assert slots.seconds == pytest.approx(23.816984688894724, rel=1e-9)
    assert slots.seconds < static.seconds / 2  # 23.8 s vs 49.6 s
    assert static == h100_time(H100_OVERRIDES).phase("rollout decode")


def test_slots_on_tpu_read_whole_compute_blocks_of_the_paged_kernel_and_skip_the_recompute_with_kept_caches():
    from rlmt_jax.plans.time_plan import time_plan

    def v5p(overrides):
        cfg = resolve("grpo_llama31_8b_instruct", ["rollout.engine=slots", "rollout.slots=32", *overrides])
        return time_plan(cfg, DeviceSpec.parse("v5p-64"), response_mean=1024)

    # splash on TPU: the paged kernel reads prompt + mean response slots, + half a 512-slot block on average
    assert "~2304 cache slots" in v5p([]).phase("rollout decode").how
    ahead = ["rollout.max_staleness=1", "algorithm.rollout_correction.weights=token"]
    recompute, keep = v5p(ahead), v5p([*ahead, "rollout.carried_cache=keep"])
    assert "carried rows" in recompute.phase("rollout prefill").how
    assert "carried rows" not in keep.phase("rollout prefill").how
    assert keep.phase("rollout prefill").seconds < recompute.phase("rollout prefill").seconds


def test_slots_steps_are_bounded_below_by_the_cap():
    # ceil(256 x 256 / 32) = 2048 < 4096: the longest row at the cap bounds the step's rollout
    slots = h100_time(SLOTS, response_mean=256).phase("rollout decode")
    assert slots.how.startswith("4096 steps = max(4096, ceil(256 rows x 256 mean / 32 slots)) x 64 rows")
    assert "~1280 cache slots" in slots.how  # prompt 1024 + mean 256
    # at the cap every row writes N: a running row has written (N + 1) / 2 on average, the static count
    at_cap = h100_time(SLOTS).phase("rollout decode")
    assert at_cap.how.startswith("32768 steps = max(4096, ceil(256 rows x 4096 mean / 32 slots))")
    assert "~3072 cache slots" in at_cap.how


def test_partial_rollouts_k1_drop_the_cap_bound_and_recompute_the_carried_rows_caches():
    plan = h100_time([*SLOTS, "rollout.slots=128"], response_mean=1024)
    slots, k1 = plan.decode_by_engine["slots"], plan.decode_by_engine["slots k=1"]
    assert slots.how.startswith("4096 steps = max(4096, ceil(256 rows x 1024 mean / 128 slots)) x 256 rows")
    assert k1.how.startswith("2048 steps = ceil(256 rows x 1024 mean / 128 slots) x 256 rows")
    assert k1.seconds == pytest.approx(slots.seconds / 2, rel=1e-12)  # the same steps, half as many
    assert plan.phase("rollout decode") == slots  # max_staleness 0: the step uses the slots engine
    ahead = h100_time([*SLOTS, "rollout.slots=128", "rollout.max_staleness=1",
                       "algorithm.rollout_correction.weights=token"], response_mean=1024)
    assert ahead.engine == "slots k=1" and ahead.phase("rollout decode") == k1
    prefill, carried = ahead.phase("rollout prefill"), plan.phase("rollout prefill")
    # 64 prompts x 1024, + up to 128 x 2 carried rows x (1024 + 512) computed again
    assert prefill.how == "64 prompts x 1024 tokens + up to 256 carried rows x 1536 (caches computed again)"
    assert carried.how == "64 prompts x 1024 tokens" and prefill.flops > 6 * carried.flops


def test_plan_cli_prints_the_decode_by_engine_and_puts_it_in_the_json(capsys):
    args = ["plan", "grpo_llama31_8b_instruct", *SLOTS, "--device-kind", "h100", "--response-mean", "1024"]
    assert main(args) == 0
    out = capsys.readouterr().out
    assert ("decode by engine (1024-token mean responses, h100): static 49.6 s | slots 23.8 s | slots k=1 23.8 s "
            "(rollout.max_staleness=1)") in out
    assert "rollout.engine slots, responses 1024 tokens on average" in out
    assert "rollout 512 rows through 64 slots x 5119 cache slots" in out
    assert main([*args, "--json"]) == 0
    timing = json.loads(capsys.readouterr().out)["time"]
    assert timing["engine"] == "slots" and timing["response_mean"] == 1024
    assert {engine: round(d["seconds"], 1) for engine, d in timing["decode_by_engine"].items()} == {
        "static": 49.6, "slots": 23.8, "slots k=1": 23.8}


def test_response_lengths_reads_the_mean_of_a_runs_metrics_and_equals_that_response_mean(tmp_path, capsys):
    metrics = tmp_path / "metrics.jsonl"
    metrics.write_text('{"step": 1, "time": 1.0, "response_tokens_mean": 1000.0}\n'
                       '{"step": 2, "time": 2.0, "loss": 0.5}\n'  # a line without the metric: skipped
                       '{"step": 3, "time": 3.0, "response_tokens_mean": 1048.0}\n')
    base = ["plan", "grpo_llama31_8b_instruct", *SLOTS, "--device-kind", "h100", "--json"]
    assert main([*base, "--response-lengths", str(metrics)]) == 0
    from_file = json.loads(capsys.readouterr().out)["time"]
    assert main([*base, "--response-mean", "1024"]) == 0
    assert from_file == json.loads(capsys.readouterr().out)["time"]
    assert from_file["response_mean"] == 1024.0


def test_response_length_options_name_what_is_wrong(tmp_path, capsys):
    from rlmt_jax.plans.time_plan import response_mean_of

    base = ["plan", "grpo_llama31_8b_instruct", *SLOTS, "--device-kind", "h100"]
    with pytest.raises(SystemExit):
        main([*base, "--response-mean", "1024", "--response-lengths", str(tmp_path / "metrics.jsonl")])
    assert "not allowed with argument" in capsys.readouterr().err
    missing = tmp_path / "missing.jsonl"
    assert main([*base, "--response-lengths", str(missing)]) == 2
    assert f"--response-lengths {missing}: cannot read it" in capsys.readouterr().err
    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n")
    with pytest.raises(UserError, match=f"--response-lengths {empty}: the file is empty"):
        response_mean_of(str(empty))
    other = tmp_path / "other.jsonl"
    other.write_text('{"step": 1, "loss": 0.5}\n{"step": 2, "response_tokens_mean": null}\n')
    with pytest.raises(UserError, match=f"--response-lengths {other}: no line has the metric 'response_tokens_mean'"):
        response_mean_of(str(other))
    with pytest.raises(UserError, match="response mean 5000 tokens .*at most rollout.max_new_tokens \\(4096\\)"):
        h100_time(SLOTS, response_mean=5000)


def test_slots_engine_kv_cache_holds_the_slots_not_the_steps_rows():
    def kv(overrides):
        cfg = resolve("grpo_llama31_8b_instruct", [*H100_OVERRIDES, *overrides])
        return memory_plan(cfg, DeviceSpec.parse("h100")).item("KV cache").bytes

    def cache(rows, slots):  # per device: rows over data 2, kv heads over tensor 4; the valid mask over data
        return 2 * 32 * rows * slots * 8 * 128 * 2 // 4 + rows * slots

    # 32 slots x 2 replicas = 64 rows of 5119 slots, + the cache of the step's 64 prompts of 1024 tokens
    slots = ["rollout.engine=slots", "rollout.slots=32"]
    assert kv(slots) == cache(64 // 2, 5119) + cache(64 // 2, 1024)
    assert kv([*slots, "rollout.prompts_per_step=128"]) == cache(64 // 2, 5119) + cache(128 // 2, 1024)
    assert kv(["rollout.engine=slots", "rollout.slots=64"]) == cache(128 // 2, 5119) + cache(64 // 2, 1024)
    assert kv(["rollout.prompts_per_step=128"]) == 2 * kv([])  # static: every row of the step
    # partial rollouts: the next step's prompts too, and the carried rows' caches computed again
    ahead = [*slots, "rollout.max_staleness=1", "algorithm.rollout_correction.weights=token"]
    assert kv(ahead) == 2 * cache(64 // 2, 5119) + cache(128 // 2, 1024)
    two_ahead = [*slots, "rollout.max_staleness=2", "algorithm.rollout_correction.weights=token"]
    assert kv(two_ahead) == 2 * cache(64 // 2, 5119) + cache(192 // 2, 1024)  # the prompts of 3 steps
    # carried rows keeping their slots: the slots' cache resident through the update, nothing recomputed
    plan = memory_plan(resolve("grpo_llama31_8b_instruct", [*ahead, "rollout.carried_cache=keep"]),
                       DeviceSpec.parse("h100"))
    kept = plan.item("kept KV cache")
    assert kept.phase == "resident" and kept.bytes == cache(64 // 2, 5119)
    assert plan.item("KV cache").bytes == cache(128 // 2, 1024)


def test_slots_engine_counts_its_token_and_logprob_buffers():
    cfg = resolve("grpo_llama31_8b_instruct", SLOTS)
    plan = memory_plan(cfg, DeviceSpec.parse("h100"))
    buffers = plan.item("slot buffers")
    assert buffers.phase == "rollout"
    # [S, N] int32 tokens + float32 log-probs + int32 versions, slots over the 2 replicas
    assert buffers.bytes == 64 // 2 * 4096 * (4 + 4 + 4)
    assert plan.shapes["cache_rows"] == 64 and plan.shapes["rollout_rows"] == 512
    static = memory_plan(resolve("grpo_llama31_8b_instruct", H100_OVERRIDES), DeviceSpec.parse("h100"))
    assert "slot buffers" not in [item.name for item in static.items]


SPLIT_8B = ["mesh.fsdp=-1", "mesh.tensor=1", "rollout.engine=slots", "rollout.mesh.tensor=1", "rollout.max_staleness=1",
            "algorithm.rollout_correction.weights=token"]


def test_split_placement_plans_the_engine_on_its_devices_and_the_training_on_the_others():
    # rollout.devices=2 on one 8xH100 host: the engine's 2 devices hold the rollout items the colocated plan
    # would hold on a 2-device host; the 6 others hold the training state and, for a moment, the whole copy
    split = memory_plan(resolve("grpo_llama31_8b_instruct", [*SPLIT_8B, "rollout.devices=2"]), DeviceSpec.parse("h100"))
    alone = memory_plan(resolve("grpo_llama31_8b_instruct", [*SPLIT_8B, "rollout.max_staleness=0"]),
                        DeviceSpec.parse("h100", 2))
    training = memory_plan(resolve("grpo_llama31_8b_instruct", [*SPLIT_8B, "rollout.max_staleness=0"]),
                           DeviceSpec.parse("h100", 6))
    assert (split.device.count, split.engine_device.count, split.mesh_shape["fsdp"]) == (6, 2, 6)
    engine = {i.name: i.bytes for i in split.items if i.phase == "engine"}
    assert engine == {i.name: i.bytes for i in alone.items if i.phase == "rollout"}
    assert split.engine_bytes == sum(engine.values())
    assert split.item("policy params").bytes == training.item("policy params").bytes
    assert split.item("rollout push").bytes == LLAMA_PARAMS * 2 and split.item("rollout push").phase == "rollout"
    assert split.peak_phase == training.peak_phase == "update" and split.peak_bytes == training.peak_bytes
    # two 8-GPU hosts: each gives 2, the engine has 4
    two_hosts = memory_plan(resolve("grpo_llama31_8b_instruct", [*SPLIT_8B, "rollout.devices=2"]),
                            DeviceSpec.parse("h100", 16))
    assert (two_hosts.device.count, two_hosts.engine_device.count) == (12, 4)
    with pytest.raises(UserError, match="rollout.devices=8: a h100 host has 8 devices"):
        memory_plan(resolve("grpo_llama31_8b_instruct", [*SPLIT_8B, "rollout.devices=8"]), DeviceSpec.parse("h100"))


def test_split_placement_step_is_the_push_then_the_longer_of_the_engine_and_the_training():
    from rlmt_jax.plans.time_plan import time_plan

    device = DeviceSpec.parse("h100")
    split = time_plan(resolve("grpo_llama31_8b_instruct", [*SPLIT_8B, "rollout.devices=2"]), device,
                      response_mean=1024)
    on_two = time_plan(resolve("grpo_llama31_8b_instruct", [*SPLIT_8B, "rollout.max_staleness=0"]),
                       DeviceSpec.parse("h100", 2), response_mean=1024)
    on_six = time_plan(resolve("grpo_llama31_8b_instruct", [*SPLIT_8B, "rollout.max_staleness=0"]),
                       DeviceSpec.parse("h100", 6), response_mean=1024)
    beside = [p.name for p in split.phases if p.beside]
    assert beside == ["rollout prefill", "rollout decode"] and split.engine_devices == 2
    for name in beside:  # the engine's phases: those of the same rollout on 2 devices
        assert split.phase(name).seconds == pytest.approx(on_two.phase(name).seconds)
    for name in ("reward scoring", "old log-probs", "reference log-probs", "update"):  # the training's: on 6
        assert split.phase(name).seconds == pytest.approx(on_six.phase(name).seconds)
    push = split.phase("rollout push").seconds
    engine = sum(p.seconds for p in split.phases if p.beside)
    rest = sum(p.seconds for p in split.phases if not p.beside) - push
    assert split.step_seconds == pytest.approx(push + max(engine, rest))
    assert split.step_seconds < sum(p.seconds for p in split.phases)  # they overlap
    assert split.engine == "slots"  # the engine samples whole steps: no rows carried, the cap bounds them
    assert split.tokens_per_second_per_chip == pytest.approx(
        split.sequence_tokens / split.step_seconds / 8)  # per chip of all 8


def test_plan_cli_says_where_split_placement_puts_what(capsys):
    assert main(["plan", "grpo_llama31_8b_instruct", *SPLIT_8B, "rollout.devices=2", "--device-kind", "h100",
                 "--response-mean", "1024"]) == 0
    out = capsys.readouterr().out
    assert "devices: 6 x h100" in out and "+ 2 decoding beside them" in out
    assert "engine devices (2, split placement)" in out
    assert "(on the 2 engine devices, beside the update)" in out and "= push + max(engine" in out
    assert main(["plan", "grpo_llama31_8b_instruct", *SPLIT_8B, "rollout.devices=2", "--json"]) == 0
    plan = json.loads(capsys.readouterr().out)
    assert plan["engine_device"]["count"] == 2 and plan["time"]["engine_devices"] == 2 and plan["engine_bytes"] > 0
