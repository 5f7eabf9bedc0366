// Direct (CUDA-core) 3x3 convolutions for the grouped PCM stages (4 or 16 channels per group),
// and the fallback for any shape the tensor-core kernels do not take (fp32, odd widths, Cin = 1).
//
// direct_tap_conv: a block owns `sx` channel slices (co_t consecutive outputs of one group each,
// threads along x, so a warp's loads and stores run along the contiguous channels) and walks 8 x 8
// tiles of grid positions (16 threads along y, 4 positions each). Per tile it stages the input halo
// in shared memory with the prologue (BatchNorm + SiLU of the previous conv) applied once per
// element, then every thread accumulates 4 positions x co_t outputs in fp32 registers from the
// tile and the block's weights (fp32, shared memory). The epilogue adds bias / folded BatchNorm,
// the activation, or the SiLU backward, and the per-channel sums for BatchNorm, reduced across the
// block in a fixed order into one partial row per block row (deterministic).
//
// direct_wgrad: every thread owns co_t x ci_t weights of one kernel row (3 taps); a block walks
// tiles of 8 x 8 output positions with dy and the input halo (prologue applied) in shared memory.
// One partial result per block row; wgrad_reduce sums them (deterministic).
#include "conv_common.cuh"
#include "conv_internal.cuh"

namespace dinocxr {
namespace cuda {
namespace {

using namespace detail;
using internal::DirectConvCfg;
using internal::DirectWgradCfg;

constexpr int kPx = 4;                   // grid positions per thread along x
constexpr int kRunsX = 2;                // threads per tile row
constexpr int kTileW = kPx * kRunsX;     // 8
constexpr int kTileH = 8;
constexpr int kRuns = kRunsX * kTileH;   // threads along y
constexpr int kMaxThreads = 32 * kRuns;  // sx <= 32

template <typename T, int CO_T>
__global__ void __launch_bounds__(kMaxThreads, 1)
    direct_tap_conv(TapConv c, DirectConvCfg k, const T* __restrict__ in, const T* __restrict__ w,
                    T* __restrict__ out, Prologue pro, Epilogue epi, int vec_out) {
  extern __shared__ __align__(16) unsigned char smem[];
  T* tile = reinterpret_cast<T*>(smem);
  float* wsm = reinterpret_cast<float*>(smem + k.tile_bytes);  // [cc][tap][sx][co_t]
  __shared__ int tap_off[kMaxTaps];

  const int cin_g = c.in_c / c.groups, cout_g = c.out_c / c.groups;
  const int n_slices = c.groups * k.spg;
  const int tx = threadIdx.x % k.sx, ty = threadIdx.x / k.sx;
  const int s_lo = blockIdx.x * k.sx;
  const int g_lo = s_lo / k.spg;
  const int n_g = k.gpb > 0 ? min(k.gpb, c.groups - g_lo) : 1;
  const int s = s_lo + tx;
  const bool slice_ok = s < n_slices;
  const int g = s / k.spg, q = s % k.spg;
  const int lg = k.gpb > 0 ? g - g_lo : 0;  // < gpb even for a slice past the end
  const int co0 = g * cout_g + q * CO_T;
  const int n_co = slice_ok ? min(CO_T, cout_g - q * CO_T) : 0;
  if (threadIdx.x == 0) {
#pragma unroll
    for (int t = 0; t < kMaxTaps; ++t)
      if (t < c.n_taps) tap_off[t] = (c.tap_dy[t] - k.dy_min) * k.hw + (c.tap_dx[t] - k.dx_min);
  }

  const int ry = ty / kRunsX, rx = ty % kRunsX;
  int pos_base[kPx];
#pragma unroll
  for (int px = 0; px < kPx; ++px) pos_base[px] = ry * c.in_stride * k.hw + (rx * kPx + px) * c.in_stride;

  const int tiles_x = (c.grid_w + kTileW - 1) / kTileW, tiles_y = (c.grid_h + kTileH - 1) / kTileH;
  const int64_t n_tiles = static_cast<int64_t>(c.batch) * tiles_y * tiles_x;
  const int n_pix = k.hh * k.hw;
  const int groups_in_tile = k.gpb > 0 ? k.gpb : 1;

  float st1[CO_T], st2[CO_T];
#pragma unroll
  for (int j = 0; j < CO_T; ++j) st1[j] = 0.f, st2[j] = 0.f;
  bool weights_ready = false;

  for (int64_t tile_i = blockIdx.y; tile_i < n_tiles; tile_i += gridDim.y) {
    const int b = static_cast<int>(tile_i / (static_cast<int64_t>(tiles_y) * tiles_x));
    const int rem = static_cast<int>(tile_i % (static_cast<int64_t>(tiles_y) * tiles_x));
    const int gy0 = (rem / tiles_x) * kTileH, gx0 = (rem % tiles_x) * kTileW;
    const int iy0 = gy0 * c.in_stride + k.dy_min, ix0 = gx0 * c.in_stride + k.dx_min;

    float acc[kPx][CO_T];
#pragma unroll
    for (int px = 0; px < kPx; ++px)
#pragma unroll
      for (int j = 0; j < CO_T; ++j) acc[px][j] = 0.f;

    for (int ci0 = 0; ci0 < cin_g; ci0 += k.cic) {
      const int cic = min(k.cic, cin_g - ci0);
      __syncthreads();  // the previous chunk / tile is no longer read
      if (!weights_ready) {
        const int n_w = cic * c.n_taps * k.sx * CO_T;
        for (int e = threadIdx.x; e < n_w; e += blockDim.x) {
          const int j = e % CO_T;
          int r = e / CO_T;
          const int sx = r % k.sx;
          r /= k.sx;
          const int t = r % c.n_taps, cc = r / c.n_taps;
          const int ss = s_lo + sx, gg = ss / k.spg, co = (ss % k.spg) * CO_T + j;
          float v = 0.f;
          if (ss < n_slices && co < cout_g)
            v = to_float(w[(static_cast<int64_t>(gg * cout_g + co) * c.n_taps + t) * cin_g + ci0 + cc]);
          wsm[e] = v;
        }
        weights_ready = !k.chunked;
      }
      // Input halo, prologue applied, zero outside the image and for groups past the end.
      const int cic_vecs = cic / k.vec, vecs_per_pix = groups_in_tile * cic_vecs;
      for (int e = threadIdx.x; e < n_pix * vecs_per_pix; e += blockDim.x) {
        const int hp = e / vecs_per_pix, lv = e % vecs_per_pix;
        const int lgi = lv / cic_vecs, cc = (lv % cic_vecs) * k.vec;
        const int iy = iy0 + hp / k.hw, ix = ix0 + hp % k.hw;
        const int ch = (g_lo + lgi) * cin_g + ci0 + cc;
        float v[8];
        if (lgi < n_g && iy >= 0 && iy < c.in_h && ix >= 0 && ix < c.in_w) {
          load_n(in + ((static_cast<int64_t>(b) * c.in_h + iy) * c.in_w + ix) * c.in_c + ch, k.vec, v);
#pragma unroll
          for (int i = 0; i < 8; ++i)
            if (i < k.vec) v[i] = prologue_value(pro, ch + i, v[i]);
        } else {
#pragma unroll
          for (int i = 0; i < 8; ++i) v[i] = 0.f;
        }
        T* dst = tile + hp * k.pix_stride + lgi * cic + cc;
#pragma unroll
        for (int i = 0; i < 8; ++i)
          if (i < k.vec) dst[i] = from_float<T>(v[i]);
      }
      __syncthreads();

      const T* tb = tile + lg * cic;
      if (cic % 4 == 0) {
        for (int cc = 0; cc < cic; cc += 4) {
          for (int t = 0; t < c.n_taps; ++t) {
            const int off = tap_off[t];
            float xv[kPx][4];
#pragma unroll
            for (int px = 0; px < kPx; ++px) load_vec<T, 4>(tb + (pos_base[px] + off) * k.pix_stride + cc, xv[px]);
#pragma unroll
            for (int u = 0; u < 4; ++u) {
              float wv[CO_T];
              load_span<float, CO_T>(wsm + ((static_cast<int64_t>(cc + u) * c.n_taps + t) * k.sx + tx) * CO_T, wv);
#pragma unroll
              for (int px = 0; px < kPx; ++px)
#pragma unroll
                for (int j = 0; j < CO_T; ++j) acc[px][j] = fmaf(xv[px][u], wv[j], acc[px][j]);
            }
          }
        }
      } else {
        for (int cc = 0; cc < cic; ++cc) {
          for (int t = 0; t < c.n_taps; ++t) {
            const int off = tap_off[t];
            float wv[CO_T];
            load_span<float, CO_T>(wsm + ((static_cast<int64_t>(cc) * c.n_taps + t) * k.sx + tx) * CO_T, wv);
#pragma unroll
            for (int px = 0; px < kPx; ++px) {
              const float xv = to_float(tb[(pos_base[px] + off) * k.pix_stride + cc]);
#pragma unroll
              for (int j = 0; j < CO_T; ++j) acc[px][j] = fmaf(xv, wv[j], acc[px][j]);
            }
          }
        }
      }
    }

    // Epilogue.
    const int gy = gy0 + ry;
#pragma unroll
    for (int px = 0; px < kPx; ++px) {
      const int gx = gx0 + rx * kPx + px;
      if (n_co == 0 || gy >= c.grid_h || gx >= c.grid_w) continue;
      const int oy = gy * c.out_stride + c.out_y0, ox = gx * c.out_stride + c.out_x0;
      const int64_t o = ((static_cast<int64_t>(b) * c.out_h + oy) * c.out_w + ox) * c.out_c + co0;
      const bool vec = vec_out && n_co == CO_T;
      float v[CO_T];
      if (epi.kind == EpiKind::kSiluBackward) {
        const T* aux = static_cast<const T*>(epi.aux) + o;
        float y[CO_T];
        if (vec) {
          load_span<T, CO_T>(aux, y);
        } else {
#pragma unroll
          for (int j = 0; j < CO_T; ++j) y[j] = j < n_co ? to_float(aux[j]) : 0.f;
        }
#pragma unroll
        for (int j = 0; j < CO_T; ++j) {
          if (j >= n_co) {
            v[j] = 0.f;
            continue;
          }
          const int ch = co0 + j;
          const float z = y[j] * __ldg(epi.z_scale + ch) + __ldg(epi.z_shift + ch);
          v[j] = acc[px][j] * silu_grad(z);
          const float d = round_to<T>(v[j]);
          st1[j] += d;
          st2[j] += d * (y[j] * __ldg(epi.xh_scale + ch) + __ldg(epi.xh_shift + ch));
        }
      } else {
#pragma unroll
        for (int j = 0; j < CO_T; ++j) {
          const int ch = min(co0 + j, c.out_c - 1);  // past n_co: computed, never stored
          const float a = acc[px][j] * ld_or(epi.scale, ch, 1.f) + ld_or(epi.shift, ch, 0.f);
          if (epi.kind == EpiKind::kStats) {
            v[j] = a;
            if (j < n_co) {
              const float r = round_to<T>(a) - ld_or(epi.ref, ch, 0.f);
              st1[j] += r;
              st2[j] += r * r;
            }
          } else {
            v[j] = activate(a, epi.act);
          }
        }
      }
      if (vec) {
        store_span<T, CO_T>(out + o, v);
      } else {
#pragma unroll
        for (int j = 0; j < CO_T; ++j)
          if (j < n_co) out[o + j] = from_float<T>(v[j]);
      }
    }
  }

  if (epi.kind != EpiKind::kAffineAct) {
    // Per-channel partial sums of this block: reduce over the y threads in a fixed order.
    __syncthreads();
    float2* red = reinterpret_cast<float2*>(smem);
#pragma unroll
    for (int j = 0; j < CO_T; ++j) red[(ty * k.sx + tx) * CO_T + j] = make_float2(st1[j], st2[j]);
    __syncthreads();
    const int rows_y = blockDim.x / k.sx;
    for (int e = threadIdx.x; e < k.sx * CO_T; e += blockDim.x) {
      const int sx = e / CO_T, j = e % CO_T;
      float2 sum = make_float2(0.f, 0.f);
      for (int yy = 0; yy < rows_y; ++yy) {
        const float2 p = red[(yy * k.sx + sx) * CO_T + j];
        sum.x += p.x, sum.y += p.y;
      }
      const int ss = s_lo + sx, co = (ss % k.spg) * CO_T + j;
      if (ss < n_slices && co < cout_g)
        epi.partials[static_cast<int64_t>(blockIdx.y) * c.out_c + (ss / k.spg) * cout_g + co] = sum;
    }
  }
}

// ---- weight gradient --------------------------------------------------------------------------
constexpr int kWTile = 8;                  // 8 x 8 output positions per tile
constexpr int kWPos = kWTile * kWTile;

template <typename T, int CO_T, int CI_T>
__global__ void __launch_bounds__(256, 1)
    direct_wgrad(WgradConv c, DirectWgradCfg k, const T* __restrict__ x, Prologue pro, const T* __restrict__ dy,
                 float* __restrict__ part_w, float* __restrict__ part_b) {
  extern __shared__ __align__(16) unsigned char smem[];
  T* dyt = reinterpret_cast<T*>(smem);                  // [64 positions][dy_stride]
  T* xt = reinterpret_cast<T*>(smem + k.dy_bytes);      // [hh * hw][x_stride]

  const int cin_g = c.in_c / c.groups, cout_g = c.out_c / c.groups;
  const int n_cis = k.ci_chunk / CI_T;  // input-channel slots of one z block
  const int cis0 = blockIdx.z * n_cis;  // its first slot in the group
  const int ipg = k.items_per_group;
  const int64_t n_items = static_cast<int64_t>(c.groups) * ipg;
  const int64_t item0 = static_cast<int64_t>(blockIdx.x) * k.threads;
  const int64_t item = item0 + threadIdx.x;

  // This thread's weights: group g, outputs cos*CO_T.., inputs cis*CI_T.., kernel row kh.
  const int g = static_cast<int>(item / ipg);
  int r = static_cast<int>(item % ipg);
  const int kh = r % 3;
  r /= 3;
  const int cis_l = r % n_cis, cos = r / n_cis;
  const int cis = cis0 + cis_l;
  const bool ok = static_cast<int>(threadIdx.x) < k.threads && item < n_items && cis * CI_T < cin_g;
  // The block's channel windows in shared memory.
  const int g_first = static_cast<int>(item0 / ipg);
  const int co_lo = g_first * cout_g + (k.gpb > 0 ? 0 : static_cast<int>(item0 % ipg) / (3 * n_cis) * CO_T);
  const int ci_lo = g_first * cin_g + cis0 * CI_T;
  const int co_loc = g * cout_g + cos * CO_T - co_lo;
  const int ci_loc = (g - g_first) * cin_g + cis_l * CI_T;
  const bool do_bias = ok && part_b != nullptr && cis == 0 && kh == 0;

  float acc[3][CI_T][CO_T], db[CO_T];
#pragma unroll
  for (int j = 0; j < CO_T; ++j) {
    db[j] = 0.f;
#pragma unroll
    for (int kw = 0; kw < 3; ++kw)
#pragma unroll
      for (int i = 0; i < CI_T; ++i) acc[kw][i][j] = 0.f;
  }

  const int tiles_x = (c.out_w + kWTile - 1) / kWTile, tiles_y = (c.out_h + kWTile - 1) / kWTile;
  const int64_t n_tiles = static_cast<int64_t>(c.batch) * tiles_y * tiles_x;
  const int dy_vecs = k.co_span / k.vec_dy, x_vecs = k.ci_span / k.vec_x;
  for (int64_t tile_i = blockIdx.y; tile_i < n_tiles; tile_i += gridDim.y) {
    const int b = static_cast<int>(tile_i / (static_cast<int64_t>(tiles_y) * tiles_x));
    const int rem = static_cast<int>(tile_i % (static_cast<int64_t>(tiles_y) * tiles_x));
    const int gy0 = (rem / tiles_x) * kWTile, gx0 = (rem % tiles_x) * kWTile;
    __syncthreads();
    for (int e = threadIdx.x; e < kWPos * dy_vecs; e += blockDim.x) {
      const int p = e / dy_vecs, cc = (e % dy_vecs) * k.vec_dy;
      const int oy = gy0 + p / kWTile, ox = gx0 + p % kWTile, ch = co_lo + cc;
      float v[8];
      if (oy < c.out_h && ox < c.out_w && ch < c.out_c) {
        load_n(dy + ((static_cast<int64_t>(b) * c.out_h + oy) * c.out_w + ox) * c.out_c + ch, k.vec_dy, v);
      } else {
#pragma unroll
        for (int i = 0; i < 8; ++i) v[i] = 0.f;
      }
#pragma unroll
      for (int i = 0; i < 8; ++i)
        if (i < k.vec_dy) dyt[p * k.dy_stride + cc + i] = from_float<T>(v[i]);
    }
    const int iy0 = gy0 * c.stride - 1, ix0 = gx0 * c.stride - 1;
    for (int e = threadIdx.x; e < k.hh * k.hw * x_vecs; e += blockDim.x) {
      const int hp = e / x_vecs, cc = (e % x_vecs) * k.vec_x;
      const int iy = iy0 + hp / k.hw, ix = ix0 + hp % k.hw, ch = ci_lo + cc;
      float v[8];
      if (iy >= 0 && iy < c.in_h && ix >= 0 && ix < c.in_w && ch < c.in_c) {
        load_n(x + ((static_cast<int64_t>(b) * c.in_h + iy) * c.in_w + ix) * c.in_c + ch, k.vec_x, v);
#pragma unroll
        for (int i = 0; i < 8; ++i)
          if (i < k.vec_x) v[i] = prologue_value(pro, ch + i, v[i]);
      } else {
#pragma unroll
        for (int i = 0; i < 8; ++i) v[i] = 0.f;
      }
#pragma unroll
      for (int i = 0; i < 8; ++i)
        if (i < k.vec_x) xt[hp * k.x_stride + cc + i] = from_float<T>(v[i]);
    }
    __syncthreads();
    if (ok) {
      for (int p = 0; p < kWPos; ++p) {
        const int py = p / kWTile, px = p % kWTile;
        float dv[CO_T];
        load_vec<T, CO_T>(dyt + p * k.dy_stride + co_loc, dv);
        if (do_bias) {
#pragma unroll
          for (int j = 0; j < CO_T; ++j) db[j] += dv[j];
        }
        const T* xrow = xt + ((py * c.stride + kh) * k.hw + px * c.stride) * k.x_stride + ci_loc;
#pragma unroll
        for (int kw = 0; kw < 3; ++kw) {
          float xv[CI_T];
          load_vec<T, CI_T>(xrow + kw * k.x_stride, xv);
#pragma unroll
          for (int i = 0; i < CI_T; ++i)
#pragma unroll
            for (int j = 0; j < CO_T; ++j) acc[kw][i][j] = fmaf(xv[i], dv[j], acc[kw][i][j]);
        }
      }
    }
  }

  if (!ok) return;
  const int64_t split = blockIdx.y;
#pragma unroll
  for (int j = 0; j < CO_T; ++j) {
    const int co = g * cout_g + cos * CO_T + j;
#pragma unroll
    for (int kw = 0; kw < 3; ++kw)
#pragma unroll
      for (int i = 0; i < CI_T; ++i)
        part_w[((split * c.out_c + co) * 9 + kh * 3 + kw) * cin_g + cis * CI_T + i] = acc[kw][i][j];
    if (do_bias) part_b[split * c.out_c + co] = db[j];
  }
}

__global__ void wgrad_reduce_kernel(const float* __restrict__ part_w, const float* __restrict__ part_b, int splits,
                                    int out_c, int cin_g, float* __restrict__ dw, float* __restrict__ db) {
  const int64_t n = static_cast<int64_t>(out_c) * 9 * cin_g;
  const int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x;
  if (i < n) {
    // i walks the partial layout [co][tap][ci]; the output is torch's [co][ci][kh][kw].
    const int64_t ci = i % cin_g, t = (i / cin_g) % 9, co = i / (9 * static_cast<int64_t>(cin_g));
    float acc = 0.f;
    for (int s = 0; s < splits; ++s) acc += part_w[s * n + i];
    dw[(co * cin_g + ci) * 9 + t] = acc;
  }
  if (db != nullptr && i < out_c) {
    float acc = 0.f;
    for (int s = 0; s < splits; ++s) acc += part_b[static_cast<int64_t>(s) * out_c + i];
    db[i] = acc;
  }
}

}  // namespace

namespace internal {

namespace {
int largest_divisor_at_most(int n, int cap) {
  for (int d = cap < n ? cap : n; d > 1; --d)
    if (n % d == 0) return d;
  return 1;
}
int pick_vec(int channels_a, int channels_b, size_t esz, const void* p) {
  for (int v = static_cast<int>(16 / esz); v > 1; v /= 2)
    if (channels_a % v == 0 && channels_b % v == 0 && aligned(p, v * esz)) return v;
  return 1;
}
size_t round16(size_t n) { return (n + 15) & ~size_t(15); }
}  // namespace

bool direct_conv_config(const TapConv& c, DType dt, const void* in, DirectConvCfg* cfg, const char** reason) {
  const size_t esz = dtype_size(dt);
  const int cin_g = c.in_c / c.groups, cout_g = c.out_c / c.groups;
  DirectConvCfg k{};
  k.co_t = cout_g % 8 == 0 ? 8 : 4;
  k.spg = (cout_g + k.co_t - 1) / k.co_t;
  int dy_min = c.tap_dy[0], dy_max = c.tap_dy[0], dx_min = c.tap_dx[0], dx_max = c.tap_dx[0];
  for (int t = 1; t < c.n_taps; ++t) {
    dy_min = c.tap_dy[t] < dy_min ? c.tap_dy[t] : dy_min;
    dy_max = c.tap_dy[t] > dy_max ? c.tap_dy[t] : dy_max;
    dx_min = c.tap_dx[t] < dx_min ? c.tap_dx[t] : dx_min;
    dx_max = c.tap_dx[t] > dx_max ? c.tap_dx[t] : dx_max;
  }
  k.dy_min = dy_min, k.dx_min = dx_min;
  k.hh = (kTileH - 1) * c.in_stride + (dy_max - dy_min) + 1;
  k.hw = (kTileW - 1) * c.in_stride + (dx_max - dx_min) + 1;
  k.vec = pick_vec(cin_g, c.in_c, esz, in);
  const size_t budget = 48 * 1024;
  const int pad = static_cast<int>(16 / esz);
  auto fits = [&](int sx, int cb, int cic) {
    const size_t tile = round16(static_cast<size_t>(k.hh) * k.hw * (cb + pad) * esz);
    const size_t wbytes = static_cast<size_t>(sx) * k.co_t * c.n_taps * cic * sizeof(float);
    const size_t red = static_cast<size_t>(sx) * kRuns * k.co_t * sizeof(float2);
    const size_t total = tile + wbytes > red ? tile + wbytes : red;
    if (total > budget) return size_t(0);
    return total;
  };
  // Largest chunk of input channels (a multiple of the load width) that fits with `sx` slices.
  auto chunk_for = [&](int sx) {
    for (int cic = cin_g - cin_g % k.vec; cic >= k.vec; cic -= k.vec)
      if (fits(sx, cic, cic)) return cic;
    return 0;
  };
  k.cic = cin_g;
  if (k.spg <= 32) {
    k.gpb = 0;
    for (int gpb = (32 / k.spg < c.groups ? 32 / k.spg : c.groups); gpb >= 1; --gpb) {
      if (fits(gpb * k.spg, gpb * cin_g, cin_g)) {
        k.gpb = gpb;
        break;
      }
    }
    if (k.gpb == 0) {  // one group per block, input channels in chunks
      k.gpb = 1;
      k.cic = chunk_for(k.spg);
    }
    k.sx = k.gpb * k.spg;
    k.cb = k.gpb * k.cic;
  } else {
    k.gpb = 0;
    k.sx = largest_divisor_at_most(k.spg, 32);
    if (!fits(k.sx, cin_g, cin_g)) k.cic = chunk_for(k.sx);
    k.cb = k.cic;
  }
  if (k.cic == 0) {
    *reason = "the direct kernel's weights and input tile do not fit in shared memory";
    return false;
  }
  k.chunked = k.cic < cin_g ? 1 : 0;
  k.pix_stride = k.cb + pad;
  k.tile_bytes = round16(static_cast<size_t>(k.hh) * k.hw * k.pix_stride * esz);
  k.smem_bytes = fits(k.sx, k.cb, k.cic);
  const int n_slices = c.groups * k.spg;
  k.block = dim3(k.sx * kRuns);
  const int64_t tiles = static_cast<int64_t>(c.batch) * ((c.grid_h + kTileH - 1) / kTileH) *
                        ((c.grid_w + kTileW - 1) / kTileW);
  const int64_t gx = (n_slices + k.sx - 1) / k.sx;
  const int64_t target = 8LL * device_sm_count();
  int64_t gy = target / gx;
  gy = gy > tiles ? tiles : gy;
  gy = gy > 65535 ? 65535 : gy;
  gy = gy < 1 ? 1 : gy;
  if (gx > 0x7fffffff) {
    *reason = "too many channels";
    return false;
  }
  k.grid = dim3(static_cast<unsigned>(gx), static_cast<unsigned>(gy));
  *cfg = k;
  return true;
}

cudaError_t direct_conv_launch(const DirectConvCfg& k, const TapConv& c, DType dt, const void* in, const void* w,
                               void* out, const Prologue& pro, const Epilogue& epi, cudaStream_t stream) {
  const int cout_g = c.out_c / c.groups;
  // Vector stores (and aux loads) of co_t channels need co_t-aligned channel offsets.
  const int vec_out = (cout_g % k.co_t == 0 && aligned(out, 16) && aligned(epi.aux, 16)) ? 1 : 0;
  cudaError_t err = cudaSuccess;
#define DINOCXR_DIRECT(T, CO)                                                                              \
  do {                                                                                                     \
    auto kernel = direct_tap_conv<T, CO>;                                                                  \
    if ((err = allow_smem(kernel, k.smem_bytes)) != cudaSuccess) return err;                              \
    kernel<<<k.grid, k.block, k.smem_bytes, stream>>>(c, k, static_cast<const T*>(in), static_cast<const T*>(w), \
                                                      static_cast<T*>(out), pro, epi, vec_out);            \
  } while (0)
  if (dt == DType::kF32) {
    if (k.co_t == 8) DINOCXR_DIRECT(float, 8); else DINOCXR_DIRECT(float, 4);
  } else if (dt == DType::kF16) {
    if (k.co_t == 8) DINOCXR_DIRECT(__half, 8); else DINOCXR_DIRECT(__half, 4);
  } else {
    if (k.co_t == 8) DINOCXR_DIRECT(__nv_bfloat16, 8); else DINOCXR_DIRECT(__nv_bfloat16, 4);
  }
#undef DINOCXR_DIRECT
  return cudaGetLastError();
}

bool direct_wgrad_config(const WgradConv& c, DType dt, const void* x, const void* dy, DirectWgradCfg* cfg,
                         const char** reason) {
  const size_t esz = dtype_size(dt);
  const int cin_g = c.in_c / c.groups, cout_g = c.out_c / c.groups;
  DirectWgradCfg k{};
  k.co_t = cout_g % 4 == 0 ? 4 : 1;
  k.ci_t = cin_g % 4 == 0 ? 4 : 1;
  const int n_cos = cout_g / k.co_t;
  if (static_cast<int64_t>(cin_g / k.ci_t) * n_cos * 3 > 0x7fffffff / 2) {
    *reason = "too many channels";
    return false;
  }
  k.hh = k.hw = (kWTile - 1) * c.stride + 3;
  // Input channels per z block: the whole group, or the largest chunk whose halo fits.
  k.ci_chunk = cin_g;
  while (k.ci_chunk > k.ci_t &&
         static_cast<size_t>(k.hh) * k.hw * ((k.ci_chunk + 7) / 8 * 8) * esz > 36 * 1024) {
    k.ci_chunk = (k.ci_chunk / 2 + k.ci_t - 1) / k.ci_t * k.ci_t;
  }
  const int n_cis = k.ci_chunk / k.ci_t;
  k.items_per_group = n_cos * n_cis * 3;
  const size_t budget = 48 * 1024;
  auto layout = [&](int co_span, int ci_span) {
    k.co_span = co_span, k.ci_span = ci_span;
    k.dy_stride = (co_span + 7) / 8 * 8;
    k.x_stride = (ci_span + 7) / 8 * 8;
    k.dy_bytes = round16(static_cast<size_t>(kWPos) * k.dy_stride * esz);
    k.smem_bytes = k.dy_bytes + static_cast<size_t>(k.hh) * k.hw * k.x_stride * esz;
    return k.smem_bytes <= budget;
  };
  bool ok = false;
  if (k.items_per_group <= 256 && k.ci_chunk == cin_g) {
    for (int gpb = (256 / k.items_per_group < c.groups ? 256 / k.items_per_group : c.groups); gpb >= 1; --gpb) {
      if (layout(gpb * cout_g, gpb * cin_g)) {
        k.gpb = gpb;
        k.threads = gpb * k.items_per_group;
        ok = true;
        break;
      }
    }
    k.vec_dy = pick_vec(cout_g, c.out_c, esz, dy);
  }
  if (!ok) {  // part of one group per block
    k.gpb = 0;
    for (int cap = 256; cap >= 32 && !ok; cap /= 2) {
      k.threads = largest_divisor_at_most(k.items_per_group, cap);
      const int per_cos = 3 * n_cis;
      int co_span = ((k.threads + per_cos - 1) / per_cos + 1) * k.co_t;
      co_span = co_span > cout_g ? cout_g : co_span;
      ok = layout(co_span, k.ci_chunk);
    }
    // The block's first output channel is a multiple of co_t inside its group.
    k.vec_dy = pick_vec(cout_g % k.co_t == 0 ? k.co_t : 1, c.out_c, esz, dy);
    if (k.co_span % k.vec_dy) k.vec_dy = 1;
  }
  if (!ok) {
    *reason = "the direct weight-gradient tiles do not fit in shared memory";
    return false;
  }
  if (k.co_span % k.vec_dy) k.vec_dy = 1;
  k.vec_x = pick_vec(k.ci_chunk, c.in_c, esz, x);  // chunks start at multiples of ci_chunk
  if (k.ci_span % k.vec_x || cin_g % k.vec_x) k.vec_x = 1;
  const int64_t n_items = static_cast<int64_t>(c.groups) * k.items_per_group;
  const int64_t gx = (n_items + k.threads - 1) / k.threads;
  const int64_t tiles = static_cast<int64_t>(c.batch) * ((c.out_h + kWTile - 1) / kWTile) *
                        ((c.out_w + kWTile - 1) / kWTile);
  int64_t gy = 8LL * device_sm_count() / gx;
  gy = gy > tiles ? tiles : gy;
  gy = gy > 1024 ? 1024 : gy;  // each split costs a partial copy of the weights
  gy = gy < 1 ? 1 : gy;
  if (gx > 0x7fffffff) {
    *reason = "too many channels";
    return false;
  }
  k.grid = dim3(static_cast<unsigned>(gx), static_cast<unsigned>(gy),
                static_cast<unsigned>((cin_g + k.ci_chunk - 1) / k.ci_chunk));
  *cfg = k;
  return true;
}

cudaError_t direct_wgrad_launch(const DirectWgradCfg& k, const WgradConv& c, DType dt, const void* x,
                                const Prologue& pro, const void* dy, float* part_w, float* part_b,
                                cudaStream_t stream) {
  const unsigned threads = static_cast<unsigned>((k.threads + 31) / 32 * 32);
  cudaError_t err = cudaSuccess;
#define DINOCXR_WGRAD(T, CO, CI)                                                                            \
  do {                                                                                                      \
    auto kernel = direct_wgrad<T, CO, CI>;                                                                  \
    if ((err = allow_smem(kernel, k.smem_bytes)) != cudaSuccess) return err;                               \
    kernel<<<k.grid, threads, k.smem_bytes, stream>>>(c, k, static_cast<const T*>(x), pro,                 \
                                                      static_cast<const T*>(dy), part_w, part_b);          \
  } while (0)
#define DINOCXR_WGRAD_T(T)                                          \
  do {                                                              \
    if (k.co_t == 4 && k.ci_t == 4) DINOCXR_WGRAD(T, 4, 4);         \
    else if (k.co_t == 4) DINOCXR_WGRAD(T, 4, 1);                   \
    else if (k.ci_t == 4) DINOCXR_WGRAD(T, 1, 4);                   \
    else DINOCXR_WGRAD(T, 1, 1);                                    \
  } while (0)
  if (dt == DType::kF32) DINOCXR_WGRAD_T(float);
  else if (dt == DType::kF16) DINOCXR_WGRAD_T(__half);
  else DINOCXR_WGRAD_T(__nv_bfloat16);
#undef DINOCXR_WGRAD_T
#undef DINOCXR_WGRAD
  return cudaGetLastError();
}

cudaError_t wgrad_reduce(const float* part_w, const float* part_b, int splits, int out_c, int cin_g, float* dw,
                         float* db, cudaStream_t stream) {
  const int64_t n = static_cast<int64_t>(out_c) * 9 * cin_g;
  const int64_t blocks = (n + 255) / 256;
  wgrad_reduce_kernel<<<static_cast<unsigned>(blocks), 256, 0, stream>>>(part_w, part_b, splits, out_c, cin_g, dw,
                                                                          db);
  return cudaGetLastError();
}

}  // namespace internal
}  // namespace cuda
}  // namespace dinocxr
