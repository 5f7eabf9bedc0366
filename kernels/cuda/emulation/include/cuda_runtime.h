// kernels/cuda/emulation: stands in for the CUDA header on the CPU.
#pragma once
#include "../simt.h"
