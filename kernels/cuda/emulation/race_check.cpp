// Runs every kernel of kernels/cuda on the emulation over a set of configurations, for
// ThreadSanitizer (build.py --race-check): a shared-memory access not ordered by a __syncthreads
// (or a warp-collective's barrier) is reported as a data race and fails the run. Numbers are not
// checked here; tests/kernels/test_cuda_emulated_kernels.py does that.
#include <cstdint>
#include <cstdio>
#include <random>
#include <vector>

extern "C" {
void emu_config(int sm_count, int smem_optin, int force_direct, int use_wgmma);
int emu_tap_conv(const int* geom, int n_taps, const int* tap_dy, const int* tap_dx, int dtype, const void* in,
                 const void* w, void* out, const float* pro_scale, const float* pro_shift, int kind, int act,
                 const float* scale, const float* shift, const float* ref, const void* aux, const float* z_scale,
                 const float* z_shift, const float* xh_scale, const float* xh_shift, float* partials,
                 int64_t capacity_rows, int64_t* rows_out, int* impl_out);
int emu_wgrad(const int* shape, int dtype, const void* x, const float* pro_scale, const float* pro_shift,
              const void* dy, float* dw, float* db, int* tensor_cores_out);
int emu_act_backward_stats(int dtype, const void* g, const void* y, int64_t rows, int channels, const float* zs,
                           const float* zb, int act, const float* xs, const float* xb, float* partials);
int64_t emu_act_backward_stats_rows(int64_t rows, int channels);
int emu_pcm_fused(const int* shape, int dtype, const void* x, const void* w1, const void* w2, const void* w3,
                  const float* s1, const float* t1, const float* s2, const float* t2, const float* s3, const float* t3,
                  void* out, int* groups_per_block);
int emu_dino_loss(int dtype, int64_t batch, int64_t n_crops, int64_t n_global, int64_t k, float inv_st, float inv_tt,
                  const void* student, const void* teacher, const float* center, float* loss, void* grad,
                  float* teacher_sum);
}

namespace {
std::mt19937 rng(0);

std::vector<uint16_t> bf16(size_t n) {  // random bf16 bits of values in [-2, 2]
  std::uniform_real_distribution<float> d(-2.f, 2.f);
  std::vector<uint16_t> v(n);
  for (auto& x : v) {
    const float f = d(rng);
    uint32_t u;
    __builtin_memcpy(&u, &f, 4);
    x = static_cast<uint16_t>(u >> 16);
  }
  return v;
}

std::vector<float> floats(size_t n, float lo, float hi) {
  std::uniform_real_distribution<float> d(lo, hi);
  std::vector<float> v(n);
  for (auto& x : v) x = d(rng);
  return v;
}

int failures = 0;
void check(int err, const char* what) {
  if (err != 0) {
    std::printf("FAILED %s: %d\n", what, err);
    ++failures;
  }
}

// Forward conv (stride s, 9 taps) with the prologue and each epilogue, on bf16.
void conv(int path, int c_in, int c_out, int groups, int stride, int b, int h, int w) {
  emu_config(2, 227 * 1024, path == 1, path == 2);
  const int oh = (h - 1) / stride + 1, ow = (w - 1) / stride + 1;
  const int geom[14] = {b, h, w, c_in, oh, ow, c_out, oh, ow, stride, 1, 0, 0, groups};
  int dy[9], dx[9];
  for (int t = 0; t < 9; ++t) dy[t] = t / 3 - 1, dx[t] = t % 3 - 1;
  auto x = bf16(size_t(b) * h * w * c_in), wt = bf16(size_t(c_out) * 9 * (c_in / groups));
  auto aux = bf16(size_t(b) * oh * ow * c_out), out = aux;
  auto ps = floats(c_in, 0.5f, 1.5f), pb = floats(c_in, -1.f, 1.f);
  auto v1 = floats(c_out, 0.5f, 1.5f), v2 = floats(c_out, -1.f, 1.f);
  std::vector<float> partials(4096 * 2 * size_t(c_out));
  int64_t rows;
  int impl;
  for (int kind = 0; kind < 3; ++kind)
    check(emu_tap_conv(geom, 9, dy, dx, 2, x.data(), wt.data(), out.data(), ps.data(), pb.data(), kind, 1, v1.data(),
                       v2.data(), v2.data(), aux.data(), v1.data(), v2.data(), v1.data(), v2.data(), partials.data(),
                       4096, &rows, &impl),
          "tap_conv");
  const int shape[9] = {b, h, w, c_in, oh, ow, c_out, groups, stride};
  std::vector<float> dw(size_t(c_out) * (c_in / groups) * 9), db(c_out);
  int tc;
  if (path != 2) check(emu_wgrad(shape, 2, x.data(), ps.data(), pb.data(), aux.data(), dw.data(), db.data(), &tc), "wgrad");
}
}  // namespace

int main() {
  // path: 0 = dispatcher's choice (mma.sync for dense), 1 = direct, 2 = wgmma
  conv(0, 64, 64, 1, 1, 1, 5, 6);
  conv(2, 64, 128, 1, 2, 1, 5, 5);
  conv(1, 64, 64, 1, 2, 1, 5, 5);
  conv(1, 16, 64, 4, 1, 2, 4, 5);
  conv(1, 64, 16, 4, 1, 1, 5, 4);
  conv(1, 256, 32, 1, 2, 1, 3, 3);  // chunked input channels
  {
    const int channels = 64, rows = 300;
    auto g = bf16(size_t(rows) * channels), y = bf16(size_t(rows) * channels);
    auto v = floats(channels, 0.5f, 1.5f);
    std::vector<float> partials(size_t(emu_act_backward_stats_rows(rows, channels)) * channels * 2);
    check(emu_act_backward_stats(2, g.data(), y.data(), rows, channels, v.data(), v.data(), 1, v.data(), v.data(),
                                 partials.data()),
          "act_backward_stats");
  }
  {
    const int shape[9] = {1, 7, 6, 16, 64, 16, 16, 4, 1};
    auto x = bf16(7 * 6 * 16), w1 = bf16(64 * 9 * 4), w2 = bf16(16 * 9 * 16), w3 = bf16(16 * 9 * 4);
    auto s = floats(64, 0.5f, 1.5f);
    std::vector<uint16_t> out(7 * 6 * 16);
    int gpb;
    check(emu_pcm_fused(shape, 2, x.data(), w1.data(), w2.data(), w3.data(), s.data(), s.data(), s.data(), s.data(),
                        nullptr, s.data(), out.data(), &gpb),
          "pcm_fused");
  }
  for (int smem : {227 * 1024, 2048}) {  // cached row, then the re-read path
    emu_config(2, smem, 0, 0);
    const int64_t batch = 2, crops = 3, k = 2048;
    auto s = bf16(size_t(crops * batch * k)), t = bf16(size_t(2 * batch * k));
    auto c = floats(k, -0.1f, 0.1f);
    std::vector<uint16_t> grad(s.size());
    std::vector<float> tsum(k);
    float loss;
    check(emu_dino_loss(2, batch, crops, 2, k, 10.f, 25.f, s.data(), t.data(), c.data(), &loss, grad.data(), tsum.data()),
          "dino_loss");
  }
  std::printf(failures ? "race check: %d launch failures\n" : "race check: all kernels ran\n", failures);
  return failures ? 1 : 0;
}
