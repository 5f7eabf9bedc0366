#include "cpu/kernel_settings.h"

#include <c10/util/Exception.h>

#include "cpu/bn_act.h"
#include "cpu/dino_loss.h"

namespace dinocxr {
namespace ops {

void limit_cpu_isa(const std::string& isa) {
  TORCH_CHECK_VALUE(cpu::set_isa_limit(isa.c_str()), "limit_cpu_isa: expected 'avx512', 'avx2' or 'portable', got '",
                    isa, "'");
}

void force_portable_cpu(bool portable) {
  cpu::set_force_portable(portable);
  cpu::set_bn_act_force_portable(portable);
}

}  // namespace ops
}  // namespace dinocxr
