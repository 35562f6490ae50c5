// The number formats kiln computes in, by the names configs, checkpoints and the Python API use.
#pragma once

#include <string>

namespace kiln {

enum class Precision {
  fp32,
  bf16,  // bfloat16 autocast for convolutions and matmuls; losses and updates stay float32
  int8,  // static int8 inference on the CPU (kiln/int8.hpp); training runs in fp32 or bf16
};

// "fp32", "bf16" or "int8".
std::string to_string(Precision precision);

// The inverse of to_string; any other name: kiln::DataError naming the accepted ones.
Precision parse_precision(const std::string& name);

}  // namespace kiln
