"""Reading a compiled step's HLO for its FLOPs, HBM traffic and collectives, and the roofline from them
(med2e3_jax/roofline.py). Expected values are counted by hand from the shapes."""

import jax
import jax.numpy as jnp
import pytest
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from med2e3_jax import roofline

needs_8_devices = pytest.mark.skipif(
    jax.device_count() < 8, reason="needs XLA_FLAGS=--xla_force_host_platform_device_count=8"
)

# A module in XLA's printed form: collectives in each replica-group form, a loop of 3 trips around an
# all-reduce and a fused dot, an all-reduce whose result each device slices to its share.
_MODULE = """HloModule jit_step, is_scheduled=true, num_partitions=8

%add (a: f32[], b: f32[]) -> f32[] {
  %a = f32[] parameter(0)
  %b = f32[] parameter(1)
  ROOT %sum = f32[] add(%a, %b)
}

%fused_dot (p0: f32[8,32], p1: f32[32,16]) -> f32[8,16] {
  %p0 = f32[8,32]{1,0} parameter(0)
  %p1 = f32[32,16]{1,0} parameter(1)
  ROOT %dot.1 = f32[8,16]{1,0} dot(%p0, %p1), lhs_contracting_dims={1}, rhs_contracting_dims={0}
}

%body (state: (s32[], f32[256], f32[8,32], f32[32,16])) -> (s32[], f32[256], f32[8,32], f32[32,16]) {
  %state = (s32[], f32[256]{0}, f32[8,32]{1,0}, f32[32,16]{1,0}) parameter(0)
  %i = s32[] get-tuple-element(%state), index=0
  %x = f32[256]{0} get-tuple-element(%state), index=1
  %lhs = f32[8,32]{1,0} get-tuple-element(%state), index=2
  %rhs = f32[32,16]{1,0} get-tuple-element(%state), index=3
  %summed = f32[256]{0} all-reduce(%x), channel_id=3, replica_groups=mesh['axis_0'=2,'axis_1'=4], device_ids=([4,2]T(1,0)) {'axis_1'}, use_global_device_ids=true, to_apply=%add
  %product = f32[8,16]{1,0} fusion(%lhs, %rhs), kind=kOutput, calls=%fused_dot
  ROOT %next = (s32[], f32[256]{0}, f32[8,32]{1,0}, f32[32,16]{1,0}) tuple(%i, %summed, %lhs, %rhs)
}

%cond (state.1: (s32[], f32[256], f32[8,32], f32[32,16])) -> pred[] {
  %state.1 = (s32[], f32[256]{0}, f32[8,32]{1,0}, f32[32,16]{1,0}) parameter(0)
  %j = s32[] get-tuple-element(%state.1), index=0
  %three = s32[] constant(3)
  ROOT %lt = pred[] compare(%j, %three), direction=LT
}

%slice_share (grad: f32[8,4], index: u32[]) -> f32[1,4] {
  %grad = f32[8,4]{1,0} parameter(0)
  %index = u32[] parameter(1)
  %zero = u32[] constant(0)
  ROOT %share = f32[1,4]{1,0} dynamic-slice(%grad, %index, %zero), dynamic_slice_sizes={1,4}
}

ENTRY %main (weights: f32[16,128], grads: bf16[1024], partial: f32[16,8], loop: (s32[], f32[256], f32[8,32], f32[32,16]), g: f32[8,4], v: f32[10], w: f32[4]) -> f32[1,4] {
  %weights = f32[16,128]{1,0} parameter(0)
  %grads = bf16[1024]{0} parameter(1)
  %partial = f32[16,8]{1,0} parameter(2)
  %loop = (s32[], f32[256]{0}, f32[8,32]{1,0}, f32[32,16]{1,0}) parameter(3)
  %g = f32[8,4]{1,0} parameter(4)
  %v = f32[10]{0} parameter(5)
  %w = f32[4]{0} parameter(6)
  %gathered = f32[64,128]{1,0} all-gather(%weights), channel_id=1, replica_groups={{0,1,2,3},{4,5,6,7}}, dimensions={0}, use_global_device_ids=true
  %reduced = bf16[1024]{0} all-reduce(%grads), channel_id=2, replica_groups=[2,4]<=[8], use_global_device_ids=true, to_apply=%add
  %scattered = f32[2,8]{1,0} reduce-scatter(%partial), channel_id=4, replica_groups=[1,8]<=[8], dimensions={0}, use_global_device_ids=true, to_apply=%add
  %looped = (s32[], f32[256]{0}, f32[8,32]{1,0}, f32[32,16]{1,0}) while(%loop), condition=%cond, body=%body, backend_config={"known_trip_count":{"n":"3"}}
  %swapped = f32[10]{0} collective-permute(%v), channel_id=5, source_target_pairs={{0,1},{1,0}}
  %exchanged = (f32[4]{0}, f32[4]{0}) all-to-all(%w, %w), channel_id=6, replica_groups={{0,1}}
  %whole = f32[8,4]{1,0} all-reduce(%g), channel_id=7, replica_groups=[1,8]<=[8], use_global_device_ids=true, to_apply=%add
  %pid = u32[] partition-id()
  ROOT %mine = f32[1,4]{1,0} fusion(%whole, %pid), kind=kLoop, calls=%slice_share
}
"""


def _by_name(counts):
    return {c.name: c for c in counts.collectives}


def test_collective_bytes_follow_the_ring_formulas_per_kind_and_group():
    counts = roofline.read_hlo(_MODULE, num_devices=8)
    found = _by_name(counts)
    # all-gather: 64 x 128 float32 = 32768 bytes gathered over 4 devices: 3/4 of it sent.
    assert found["gathered"].groups == ((0, 1, 2, 3), (4, 5, 6, 7))
    assert found["gathered"].bytes_moved == 24576
    # all-reduce: 1024 bf16 = 2048 bytes over groups of 4 (iota [2,4]): 2 x 3/4 x 2048.
    assert found["reduced"].groups == ((0, 1, 2, 3), (4, 5, 6, 7))
    assert found["reduced"].bytes_moved == 3072
    # reduce-scatter: a 2 x 8 float32 result (64 bytes) of a 512-byte operand over 8 devices: 7/8 x 512.
    assert found["scattered"].bytes_moved == 448
    # collective-permute: every device sends its 10 float32 once.
    assert found["swapped"].bytes_moved == 40 and found["swapped"].groups == ((0, 1), (1, 0))
    # all-to-all: two 4-float32 pieces (32 bytes) over 2 devices: half of it leaves.
    assert found["exchanged"].bytes_moved == 16


def test_loop_bodies_count_once_per_trip_and_fused_dots_count_their_flops():
    counts = roofline.read_hlo(_MODULE, num_devices=8)
    summed = _by_name(counts)["summed"]
    # mesh form: ids [[0,2,4,6],[1,3,5,7]] laid on axes (2, 4); groups run along axis_1.
    assert summed.groups == ((0, 2, 4, 6), (1, 3, 5, 7))
    assert summed.executions == 3 and summed.bytes_moved == 2 * 3 / 4 * 1024
    assert counts.loop_trip_counts == (3,)
    # (8 x 32) @ (32 x 16): 2 x 8 x 16 x 32 FLOPs, three times.
    assert counts.matmul_flops == 3 * 2 * 8 * 16 * 32
    totals = counts.collective_bytes()
    assert totals["all-reduce"] == 3072 + 3 * 1536
    assert totals["collective-permute"] == 40 and totals["all-to-all"] == 16


def test_an_all_reduce_each_device_slices_to_its_share_counts_as_a_reduce_scatter():
    counts = roofline.read_hlo(_MODULE, num_devices=8)
    whole = [c for c in counts.collectives if c.name == "whole"]
    assert [c.kind for c in whole] == ["reduce-scatter"]
    # 8 x 4 float32 = 128 bytes reduced, each device keeps 16 of them: 7/8 x 128 sent, not 2 x 7/8 x 128.
    assert whole[0].result_bytes == 16 and whole[0].bytes_moved == 112


def test_memory_traffic_counts_operands_and_results_of_top_level_instructions():
    counts = roofline.read_hlo(_MODULE, num_devices=8)
    entry = (
        (8192 + 32768)  # all-gather: 16 x 128 in, 64 x 128 out, float32
        + 2 * 2048  # all-reduce of 1024 bf16
        + (512 + 64)  # reduce-scatter
        + 2 * 40 + 2 * 32  # collective-permute; all-to-all (two 16-byte operands, a 32-byte tuple)
        + 2 * 128  # the all-reduce sliced to a share
        + (128 + 4 + 16)  # the slicing fusion: the array and the partition id in, the share out
    )
    # Per trip: the all-reduce (1024 in and out) and the dot fusion (1024 + 2048 in, 512 out); the
    # loop's compare counts 4 + 4 in and 1 out, 4 times (the condition runs once more than the body).
    body = 2 * 1024 + (1024 + 2048 + 512)
    condition = 4 + 4 + 1
    assert counts.memory_bytes == entry + 3 * body + 4 * condition


@pytest.mark.parametrize("attributes, groups", [
    ("replica_groups={{0,2},{1,3}}, dimensions={0}", ((0, 2), (1, 3))),
    ("replica_groups={}, to_apply=%add", ((0, 1, 2, 3),)),
    ("replica_groups=[2,2]<=[2,2]T(1,0), use_global_device_ids=true", ((0, 2), (1, 3))),
    ("replica_groups=mesh['axis_0'=2,'axis_1'=2] {'axis_0'}, use_global_device_ids=true", ((0, 2), (1, 3))),
    ("replica_groups=mesh['axis_0'=2,'axis_1'=2] {'axis_0','axis_1'}, use_global_device_ids=true",
     ((0, 1, 2, 3),)),
])
def test_replica_groups_read_from_every_printed_form(attributes, groups):
    assert roofline.replica_groups(attributes, num_devices=4) == groups


def test_a_loop_without_a_known_trip_count_is_refused():
    module = _MODULE.replace(', backend_config={"known_trip_count":{"n":"3"}}', "")
    with pytest.raises(ValueError, match="known_trip_count"):
        roofline.read_hlo(module, num_devices=8)


@needs_8_devices
def test_compiled_psum_and_loop_on_8_devices_give_the_bytes_and_flops_counted_by_hand():
    mesh = jax.make_mesh((2, 4), ("a", "b"), axis_types=(jax.sharding.AxisType.Auto,) * 2)

    def reduce_over_b(x):
        return jax.lax.psum(x, "b")

    psum = jax.shard_map(reduce_over_b, mesh=mesh, in_specs=P(), out_specs=P(), check_vma=False)
    compiled = jax.jit(psum).lower(jax.ShapeDtypeStruct((256, 64), jnp.float32)).compile()
    counts = roofline.read_hlo(compiled.as_text(), num_devices=8)
    (reduce,) = counts.collectives
    assert reduce.kind == "all-reduce" and sorted(reduce.groups) == [(0, 1, 2, 3), (4, 5, 6, 7)]
    assert counts.collective_bytes()["all-reduce"] == 2 * 3 / 4 * 256 * 64 * 4

    def steps(x, w):
        # w's rows split over b: each device contracts its 32 of 128, and the partial products are
        # summed over b on every trip.
        return jax.lax.scan(lambda c, _: (jnp.tanh(c @ w), None), x, None, length=5)[0]

    x = jax.ShapeDtypeStruct((64, 128), jnp.float32, sharding=NamedSharding(mesh, P("a", None)))
    w = jax.ShapeDtypeStruct((128, 128), jnp.float32, sharding=NamedSharding(mesh, P("b", None)))
    counts = roofline.read_hlo(jax.jit(steps).lower(x, w).compile().as_text(), num_devices=8)
    # Per device and trip: (32 rows x 32 contracted) @ (32 x 128).
    assert counts.matmul_flops == 5 * 2 * 32 * 32 * 128
    assert 5 in counts.loop_trip_counts
    assert sum(c.executions for c in counts.collectives if c.kind == "all-reduce") == 5


def test_roofline_takes_the_slowest_term_and_slower_links_between_hosts():
    device = roofline.Device(peak_flops=100e12, hbm_bandwidth=1e12, link_bandwidth=100e9,
                             host_link_bandwidth=10e9, devices_per_host=4)
    inside = roofline.Collective("all-gather", "inside", 400e6, ((0, 1, 2, 3), (4, 5, 6, 7)), 1)
    across = roofline.Collective("all-reduce", "across", 100e6, ((0, 4), (1, 5), (2, 6), (3, 7)), 1)
    assert not inside.spans_hosts(4) and across.spans_hosts(4)
    bounds = roofline.roofline(1e12, 5e9, [inside, across], device)
    assert bounds.compute_s == pytest.approx(0.010)  # 1e12 / 100e12
    assert bounds.memory_s == pytest.approx(0.005)  # 5e9 / 1e12
    # 3/4 x 400 MB at 100 GB/s = 3 ms inside a host; 2 x 1/2 x 100 MB at 10 GB/s = 10 ms between hosts.
    assert bounds.network_s == pytest.approx(0.013) and bounds.network_host_s == pytest.approx(0.010)
    assert bounds.bound == "network" and bounds.step_s == pytest.approx(0.013)
    assert roofline.mfu(0.65e12, bounds.step_s, device.peak_flops) == pytest.approx(0.5)
