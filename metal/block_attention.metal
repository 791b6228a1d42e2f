// SBD attention for decode and verified forwards: the body of an mx.fast.metal_kernel (MLX generates the
// signature).
//
// New query row t may attend key j iff j < visible[t] or lo[t] <= j < hi[t]: a visible prefix plus the row's own
// mask block (lo = hi for causal rows), three int32 arrays of length q_len instead of a [q_len, n_keys] mask.
// Every layout is of this form (masks.span_mask): the decode step (SBD_METHOD.md section 3: visible = offset+t+1
// before causal_point, n_keys from it on) and pre-drafting's blocks at shared positions (masks.predraft_spans).
// A row must see at least one key overall; one that sees none gets 0 (SDPA's output is undefined there).
//
// Launch (mlx_sbd/metal_kernel.py): threadgroups of 4 simdgroups x 32 lanes;
//   threadgroup_position_in_grid.x = tile of 32 rows, .y = batch * Hkv + kv head, .z = key split.
// A "row" is one (query head of the GQA group, new token) pair, so all rows of a threadgroup share one
// K/V head and read K/V once per 32 rows. Each simdgroup owns 8 rows and walks its split's keys 32 at
// a time: lane = key for the scores, lane = head dims for P.V. Online softmax in float32.
// Outputs per split: out [splits, B, Hq, T, D] (normalised by the split's own sum) and
// lse [splits, B, Hq, T] (log-sum-exp of the scaled scores); the wrapper merges the splits.
// Inputs are read through their strides (ensure_row_contiguous=False): k/v are cache views.
// Only simdgroup-level synchronisation is used, so an idle simdgroup may return early.
// Stay inside the MSL subset emulated by tests/metal_emulator/msl_shim.h.

constexpr int SIMDGROUPS = 4;
constexpr int ROWS = 8;                // rows per simdgroup
constexpr int DIMS_PER_LANE = D / 32;  // head dims each lane accumulates in P.V
constexpr float NEG = -3.0e38f;        // finite "minus infinity": no inf arithmetic, whatever the math mode

threadgroup float q_tile[SIMDGROUPS * ROWS * D];  // this threadgroup's queries, pre-scaled, float32
threadgroup float p_tile[SIMDGROUPS * ROWS * 32];  // probabilities of the current 32-key tile

const int n_batch = q_shape[0];
const int n_q_heads = q_shape[1];
const int q_len = q_shape[2];
const int n_kv_heads = k_shape[1];
const int n_keys = k_shape[2];
const int group = n_q_heads / n_kv_heads;
const int n_rows = group * q_len;

const int sg = simdgroup_index_in_threadgroup;
const int lane = thread_index_in_simdgroup;
const int b = threadgroup_position_in_grid.y / n_kv_heads;
const int kv_head = threadgroup_position_in_grid.y % n_kv_heads;
const int row0 = (threadgroup_position_in_grid.x * SIMDGROUPS + sg) * ROWS;
if (row0 >= n_rows) {
  return;  // the whole simdgroup is idle
}

// This split's keys: [key_begin, key_end), a multiple of 32 long.
const int n_splits = threadgroups_per_grid.z;
const int split = threadgroup_position_in_grid.z;
const int chunk = ((n_keys + n_splits - 1) / n_splits + 31) / 32 * 32;
const int key_begin = split * chunk;
const int key_end = min(key_begin + chunk, n_keys);

// Per row: its query head, token, and the keys it may attend: [0, row_visible) and [row_lo, row_hi).
const int qs = sg * ROWS * D;  // this simdgroup's slices of q_tile and p_tile
const int ps = sg * ROWS * 32;
int head[ROWS];
int tok[ROWS];
int row_visible[ROWS];
int row_lo[ROWS];
int row_hi[ROWS];
for (int r = 0; r < ROWS; r++) {
  const int row = min(row0 + r, n_rows - 1);  // padding rows repeat the last row and are never written
  head[r] = kv_head * group + row / q_len;
  tok[r] = row % q_len;
  row_visible[r] = visible[tok[r] * visible_strides[0]];
  row_lo[r] = lo[tok[r] * lo_strides[0]];
  row_hi[r] = hi[tok[r] * hi_strides[0]];
  const int64_t q_base = b * q_strides[0] + head[r] * q_strides[1] + tok[r] * q_strides[2];
  for (int d = lane; d < D; d += 32) {
    q_tile[qs + r * D + d] = scale * static_cast<float>(q[q_base + d * q_strides[3]]);
  }
}
simdgroup_barrier(mem_flags::mem_threadgroup);

float m[ROWS];
float l[ROWS];
float acc[ROWS][DIMS_PER_LANE];
for (int r = 0; r < ROWS; r++) {
  m[r] = NEG;
  l[r] = 0.0f;
  for (int i = 0; i < DIMS_PER_LANE; i++) {
    acc[r][i] = 0.0f;
  }
}

const int64_t k_base = b * k_strides[0] + kv_head * k_strides[1];
const int64_t v_base = b * v_strides[0] + kv_head * v_strides[1];
for (int j0 = key_begin; j0 < key_end; j0 += 32) {
  // Scores: lane owns key j.
  const int j = j0 + lane;
  float s[ROWS];
  for (int r = 0; r < ROWS; r++) {
    s[r] = 0.0f;
  }
  if (j < key_end) {
    const int64_t kj = k_base + j * k_strides[2];
    for (int d = 0; d < D; d++) {
      const float kd = static_cast<float>(k[kj + d * k_strides[3]]);
      for (int r = 0; r < ROWS; r++) {
        s[r] += q_tile[qs + r * D + d] * kd;
      }
    }
  }
  // Online softmax update; masked keys get probability exactly 0.
  for (int r = 0; r < ROWS; r++) {
    const bool allowed = j < key_end && (j < row_visible[r] || (j >= row_lo[r] && j < row_hi[r]));
    const float m_new = metal::max(m[r], simd_max(allowed ? s[r] : NEG));
    const float p = allowed ? metal::exp(s[r] - m_new) : 0.0f;
    const float correction = metal::exp(m[r] - m_new);
    l[r] = l[r] * correction + simd_sum(p);
    for (int i = 0; i < DIMS_PER_LANE; i++) {
      acc[r][i] *= correction;
    }
    m[r] = m_new;
    p_tile[ps + r * 32 + lane] = p;
  }
  simdgroup_barrier(mem_flags::mem_threadgroup);
  // P.V: lane owns head dims lane, lane + 32, ... (coalesced reads of each value row).
  const int n_tile = min(32, key_end - j0);
  for (int jj = 0; jj < n_tile; jj++) {
    const int64_t vj = v_base + (j0 + jj) * v_strides[2];
    for (int i = 0; i < DIMS_PER_LANE; i++) {
      const float vd = static_cast<float>(v[vj + (lane + 32 * i) * v_strides[3]]);
      for (int r = 0; r < ROWS; r++) {
        acc[r][i] += p_tile[ps + r * 32 + jj] * vd;
      }
    }
  }
  simdgroup_barrier(mem_flags::mem_threadgroup);
}

// A row with no allowed key in this split (l = 0; with two key ranges any split may be one) writes out = 0 and
// lse = NEG, so the merge gives it weight exp(NEG - max) = 0 beside a split with allowed keys.
for (int r = 0; r < ROWS && row0 + r < n_rows; r++) {
  const int64_t row_index = ((int64_t(split) * n_batch + b) * n_q_heads + head[r]) * q_len + tok[r];
  const float inv = l[r] > 0.0f ? 1.0f / l[r] : 0.0f;
  for (int i = 0; i < DIMS_PER_LANE; i++) {
    out[row_index * D + lane + 32 * i] = acc[r][i] * inv;
  }
  if (lane == 0) {
    lse[row_index] = l[r] > 0.0f ? m[r] + metal::log(l[r]) : NEG;
  }
}
