// BatchNorm statistics, coefficients and the elementwise activation passes around the fused
// convolutions (math: dinocxr_fast/ops/conv_bn_act.py, which plans the calls).
//
// Partial sums arrive as [rows][channels] float2 from the convolution epilogues or from
// act_backward_stats; the finalize kernels reduce them per channel in double, in a fixed order
// (deterministic), and turn them into the per-channel affine maps the next kernels apply.
#include "conv3x3.cuh"
#include "conv_common.cuh"

namespace dinocxr {
namespace cuda {
namespace {

using namespace detail;

__global__ void bn_forward_finalize_kernel(const float2* __restrict__ partials, int64_t rows, int channels,
                                           double count, const float* __restrict__ ref,
                                           const float* __restrict__ gamma, const float* __restrict__ beta, float eps,
                                           float momentum, const float* __restrict__ running_mean,
                                           const float* __restrict__ running_var, float* __restrict__ out) {
  const int c = blockIdx.x * blockDim.x + threadIdx.x;
  if (c >= channels) return;
  double s1 = 0.0, s2 = 0.0;
  for (int64_t r = 0; r < rows; ++r) {
    const float2 p = partials[r * channels + c];
    s1 += p.x;
    s2 += p.y;
  }
  // The sums are of (y - ref): mean = ref + E[d], var = E[d^2] - E[d]^2 without cancellation
  // when ref is near the mean.
  const double d = s1 / count;
  const double var = fmax(s2 / count - d * d, 0.0);
  const double mean = (ref == nullptr ? 0.0 : ref[c]) + d;
  const double invstd = 1.0 / sqrt(var + static_cast<double>(eps));
  const double scale = gamma[c] * invstd;
  const double unbiased = count > 1.0 ? var * count / (count - 1.0) : var;
  out[c] = static_cast<float>(mean);
  out[channels + c] = static_cast<float>(invstd);
  out[2 * channels + c] = static_cast<float>(scale);
  out[3 * channels + c] = static_cast<float>(beta[c] - mean * scale);
  const double m = momentum;
  out[4 * channels + c] = running_mean == nullptr ? 0.f : static_cast<float>((1.0 - m) * running_mean[c] + m * mean);
  out[5 * channels + c] = running_var == nullptr ? 0.f : static_cast<float>((1.0 - m) * running_var[c] + m * unbiased);
}

__global__ void bn_backward_finalize_kernel(const float2* __restrict__ partials, int64_t rows, int channels,
                                            double count, const float* __restrict__ gamma,
                                            const float* __restrict__ mean, const float* __restrict__ invstd,
                                            int training, float* __restrict__ out) {
  const int c = blockIdx.x * blockDim.x + threadIdx.x;
  if (c >= channels) return;
  double sz = 0.0, sxz = 0.0;
  for (int64_t r = 0; r < rows; ++r) {
    const float2 p = partials[r * channels + c];
    sz += p.x;
    sxz += p.y;
  }
  const double a = static_cast<double>(gamma[c]) * invstd[c];
  double b = 0.0, cc = 0.0;
  if (training) {  // dy = a * (dz - mean(dz) - xhat * mean(dz * xhat)), xhat = (y - mean) * invstd
    b = -a * invstd[c] * sxz / count;
    cc = -a * sz / count - b * mean[c];
  }
  out[c] = static_cast<float>(sxz);  // dgamma
  out[channels + c] = static_cast<float>(sz);  // dbeta
  out[2 * channels + c] = static_cast<float>(a);
  out[3 * channels + c] = static_cast<float>(b);
  out[4 * channels + c] = static_cast<float>(cc);
}

// ---- elementwise ------------------------------------------------------------------------------
// VEC consecutive elements share a row (channels % VEC == 0), so their channels are c..c+VEC-1.
template <typename T, int VEC>
__global__ void affine_act_kernel(const T* __restrict__ y, T* __restrict__ out, int64_t n, int channels,
                                  const float* __restrict__ scale, const float* __restrict__ shift, Act act) {
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x * VEC;
  for (int64_t i = (static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x) * VEC; i < n; i += stride) {
    const int c = static_cast<int>(i % channels);
    float v[VEC];
    load_vec<T, VEC>(y + i, v);
#pragma unroll
    for (int e = 0; e < VEC; ++e) v[e] = activate(v[e] * ld_or(scale, c + e, 1.f) + ld_or(shift, c + e, 0.f), act);
    store_vec<T, VEC>(out + i, v);
  }
}

template <typename T, int VEC>
__global__ void bn_backward_apply_kernel(const T* g, const T* __restrict__ y, T* dy, int64_t n,  // dy may alias g
                                         int channels, const float* __restrict__ z_scale,
                                         const float* __restrict__ z_shift, Act act, const float* __restrict__ a,
                                         const float* __restrict__ b, const float* __restrict__ cc) {
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x * VEC;
  for (int64_t i = (static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x) * VEC; i < n; i += stride) {
    const int c = static_cast<int>(i % channels);
    float gv[VEC], yv[VEC], out[VEC];
    load_vec<T, VEC>(g + i, gv);
    load_vec<T, VEC>(y + i, yv);
#pragma unroll
    for (int e = 0; e < VEC; ++e) {
      float dz = gv[e];
      if (act != Act::kNone)
        dz = round_to<T>(dz * activate_grad(yv[e] * ld_or(z_scale, c + e, 1.f) + ld_or(z_shift, c + e, 0.f), act));
      out[e] = __ldg(a + c + e) * dz + ld_or(b, c + e, 0.f) * yv[e] + ld_or(cc, c + e, 0.f);
    }
    store_vec<T, VEC>(dy + i, out);
  }
}

// Per-channel sums over rows of dz = g * act'(z) and dz * xhat. Block (32 channel vectors, 8 row
// lanes); block x owns rows r = blockIdx.x * 8 + ty (mod gridDim.x * 8) and writes partial row
// blockIdx.x.
constexpr int kRowLanes = 8;

template <typename T, int VEC>
__global__ void __launch_bounds__(32 * kRowLanes)
    act_backward_stats_kernel(const T* __restrict__ g, const T* __restrict__ y, int64_t rows, int channels,
                              const float* __restrict__ z_scale, const float* __restrict__ z_shift, Act act,
                              const float* __restrict__ xh_scale, const float* __restrict__ xh_shift,
                              float2* __restrict__ partials) {
  __shared__ float2 red[kRowLanes][32 * VEC];
  const int tx = threadIdx.x % 32, ty = threadIdx.x / 32;
  const int c = (blockIdx.y * 32 + tx) * VEC;
  const bool ok = c < channels;
  float s1[VEC], s2[VEC], zs[VEC], zb[VEC], xs[VEC], xb[VEC];
#pragma unroll
  for (int e = 0; e < VEC; ++e) {
    s1[e] = s2[e] = 0.f;
    const int ch = ok ? c + e : 0;
    zs[e] = ld_or(z_scale, ch, 1.f), zb[e] = ld_or(z_shift, ch, 0.f);
    xs[e] = ld_or(xh_scale, ch, 1.f), xb[e] = ld_or(xh_shift, ch, 0.f);
  }
  if (ok) {
    for (int64_t r = static_cast<int64_t>(blockIdx.x) * kRowLanes + ty; r < rows;
         r += static_cast<int64_t>(gridDim.x) * kRowLanes) {
      float gv[VEC], yv[VEC];
      load_vec<T, VEC>(g + r * channels + c, gv);
      load_vec<T, VEC>(y + r * channels + c, yv);
#pragma unroll
      for (int e = 0; e < VEC; ++e) {
        const float dz = round_to<T>(gv[e] * activate_grad(yv[e] * zs[e] + zb[e], act));
        s1[e] += dz;
        s2[e] += dz * (yv[e] * xs[e] + xb[e]);
      }
    }
  }
#pragma unroll
  for (int e = 0; e < VEC; ++e) red[ty][tx * VEC + e] = make_float2(s1[e], s2[e]);
  __syncthreads();
  for (int i = threadIdx.x; i < 32 * VEC; i += blockDim.x) {
    float2 sum = make_float2(0.f, 0.f);
#pragma unroll
    for (int l = 0; l < kRowLanes; ++l) sum.x += red[l][i].x, sum.y += red[l][i].y;
    const int ch = blockIdx.y * 32 * VEC + i;
    if (ch < channels) partials[static_cast<int64_t>(blockIdx.x) * channels + ch] = sum;
  }
}

inline bool is_aligned(const void* p, size_t bytes) {
  return p == nullptr || reinterpret_cast<uintptr_t>(p) % bytes == 0;
}

unsigned elementwise_blocks(int64_t n, int vec) {
  const int64_t want = (n / vec + 255) / 256;
  const int64_t cap = 16LL * device_sm_count();
  return static_cast<unsigned>(want < 1 ? 1 : (want > cap ? cap : want));
}

template <typename T>
cudaError_t affine_act_t(const void* y, void* out, int64_t rows, int channels, const float* scale,
                         const float* shift, Act act, cudaStream_t stream) {
  const int64_t n = rows * channels;
  constexpr int kVec = 16 / sizeof(T);
  if (channels % kVec == 0 && is_aligned(y, 16) && is_aligned(out, 16)) {
    affine_act_kernel<T, kVec><<<elementwise_blocks(n, kVec), 256, 0, stream>>>(
        static_cast<const T*>(y), static_cast<T*>(out), n, channels, scale, shift, act);
  } else {
    affine_act_kernel<T, 1><<<elementwise_blocks(n, 1), 256, 0, stream>>>(
        static_cast<const T*>(y), static_cast<T*>(out), n, channels, scale, shift, act);
  }
  return cudaGetLastError();
}

template <typename T>
cudaError_t bn_backward_apply_t(const void* g, const void* y, void* dy, int64_t rows, int channels,
                                const float* z_scale, const float* z_shift, Act act, const float* a, const float* b,
                                const float* c, cudaStream_t stream) {
  const int64_t n = rows * channels;
  constexpr int kVec = 16 / sizeof(T);
  if (channels % kVec == 0 && is_aligned(g, 16) && is_aligned(y, 16) && is_aligned(dy, 16)) {
    bn_backward_apply_kernel<T, kVec><<<elementwise_blocks(n, kVec), 256, 0, stream>>>(
        static_cast<const T*>(g), static_cast<const T*>(y), static_cast<T*>(dy), n, channels, z_scale, z_shift, act,
        a, b, c);
  } else {
    bn_backward_apply_kernel<T, 1><<<elementwise_blocks(n, 1), 256, 0, stream>>>(
        static_cast<const T*>(g), static_cast<const T*>(y), static_cast<T*>(dy), n, channels, z_scale, z_shift, act,
        a, b, c);
  }
  return cudaGetLastError();
}

template <typename T>
cudaError_t act_backward_stats_t(const void* g, const void* y, int64_t rows, int channels, const float* z_scale,
                                 const float* z_shift, Act act, const float* xh_scale, const float* xh_shift,
                                 float2* partials, cudaStream_t stream) {
  const unsigned gx = static_cast<unsigned>(act_backward_stats_rows(rows, channels));
  constexpr int kVec = 16 / sizeof(T);
  if (channels % kVec == 0 && is_aligned(g, 16) && is_aligned(y, 16)) {
    const dim3 grid(gx, static_cast<unsigned>((channels / kVec + 31) / 32));
    act_backward_stats_kernel<T, kVec><<<grid, 32 * kRowLanes, 0, stream>>>(
        static_cast<const T*>(g), static_cast<const T*>(y), rows, channels, z_scale, z_shift, act, xh_scale, xh_shift,
        partials);
  } else {
    const dim3 grid(gx, static_cast<unsigned>((channels + 31) / 32));
    act_backward_stats_kernel<T, 1><<<grid, 32 * kRowLanes, 0, stream>>>(
        static_cast<const T*>(g), static_cast<const T*>(y), rows, channels, z_scale, z_shift, act, xh_scale, xh_shift,
        partials);
  }
  return cudaGetLastError();
}

}  // namespace

cudaError_t bn_forward_finalize(const float2* partials, int64_t rows, int channels, int64_t count, const float* ref,
                                const float* gamma, const float* beta, float eps, float momentum,
                                const float* running_mean, const float* running_var, float* out,
                                cudaStream_t stream) {
  if (partials == nullptr || rows < 1 || channels < 1 || count < 1 || gamma == nullptr || beta == nullptr ||
      out == nullptr)
    return cudaErrorInvalidValue;
  bn_forward_finalize_kernel<<<(channels + 127) / 128, 128, 0, stream>>>(
      partials, rows, channels, static_cast<double>(count), ref, gamma, beta, eps, momentum, running_mean,
      running_var, out);
  return cudaGetLastError();
}

cudaError_t bn_backward_finalize(const float2* partials, int64_t rows, int channels, int64_t count,
                                 const float* gamma, const float* mean, const float* invstd, bool training,
                                 float* out, cudaStream_t stream) {
  if (partials == nullptr || rows < 1 || channels < 1 || count < 1 || gamma == nullptr || mean == nullptr ||
      invstd == nullptr || out == nullptr)
    return cudaErrorInvalidValue;
  bn_backward_finalize_kernel<<<(channels + 127) / 128, 128, 0, stream>>>(
      partials, rows, channels, static_cast<double>(count), gamma, mean, invstd, training ? 1 : 0, out);
  return cudaGetLastError();
}

cudaError_t affine_act(DType dt, const void* y, void* out, int64_t rows, int channels, const float* scale,
                       const float* shift, Act act, cudaStream_t stream) {
  if (rows < 1 || channels < 1) return cudaErrorInvalidValue;
  switch (dt) {
    case DType::kF32: return affine_act_t<float>(y, out, rows, channels, scale, shift, act, stream);
    case DType::kF16: return affine_act_t<__half>(y, out, rows, channels, scale, shift, act, stream);
    default: return affine_act_t<__nv_bfloat16>(y, out, rows, channels, scale, shift, act, stream);
  }
}

int64_t act_backward_stats_rows(int64_t rows, int channels) {
  (void)channels;
  const int64_t want = (rows + 8 * kRowLanes - 1) / (8 * kRowLanes);
  return want < 1 ? 1 : (want > 512 ? 512 : want);
}

cudaError_t act_backward_stats(DType dt, const void* g, const void* y, int64_t rows, int channels,
                               const float* z_scale, const float* z_shift, Act act, const float* xh_scale,
                               const float* xh_shift, float2* partials, cudaStream_t stream) {
  if (rows < 1 || channels < 1 || partials == nullptr) return cudaErrorInvalidValue;
  switch (dt) {
    case DType::kF32:
      return act_backward_stats_t<float>(g, y, rows, channels, z_scale, z_shift, act, xh_scale, xh_shift, partials,
                                         stream);
    case DType::kF16:
      return act_backward_stats_t<__half>(g, y, rows, channels, z_scale, z_shift, act, xh_scale, xh_shift, partials,
                                          stream);
    default:
      return act_backward_stats_t<__nv_bfloat16>(g, y, rows, channels, z_scale, z_shift, act, xh_scale, xh_shift,
                                                 partials, stream);
  }
}

cudaError_t bn_backward_apply(DType dt, const void* g, const void* y, void* dy, int64_t rows, int channels,
                              const float* z_scale, const float* z_shift, Act act, const float* a, const float* b,
                              const float* c, cudaStream_t stream) {
  if (rows < 1 || channels < 1 || a == nullptr) return cudaErrorInvalidValue;
  switch (dt) {
    case DType::kF32:
      return bn_backward_apply_t<float>(g, y, dy, rows, channels, z_scale, z_shift, act, a, b, c, stream);
    case DType::kF16:
      return bn_backward_apply_t<__half>(g, y, dy, rows, channels, z_scale, z_shift, act, a, b, c, stream);
    default:
      return bn_backward_apply_t<__nv_bfloat16>(g, y, dy, rows, channels, z_scale, z_shift, act, a, b, c, stream);
  }
}

}  // namespace cuda
}  // namespace dinocxr
