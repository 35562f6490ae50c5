#include "kiln/precision.hpp"

#include "kiln/error.hpp"

namespace kiln {

std::string to_string(Precision precision) {
  switch (precision) {
    case Precision::fp32:
      return "fp32";
    case Precision::bf16:
      return "bf16";
    case Precision::int8:
      return "int8";
  }
  return "?";
}

Precision parse_precision(const std::string& name) {
  for (auto precision : {Precision::fp32, Precision::bf16, Precision::int8}) {
    if (name == to_string(precision)) return precision;
  }
  throw_data_error("precision must be 'fp32', 'bf16' or 'int8', got '" + name + "'");
}

}  // namespace kiln
