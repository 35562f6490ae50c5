#include "kiln/precision.hpp"

#include <gtest/gtest.h>

#include <string>
#include <utility>

#include "kiln/error.hpp"
#include "test_helpers.hpp"

namespace kiln {
namespace {

class precision_name : public ::testing::TestWithParam<std::pair<const char*, Precision>> {};

TEST_P(precision_name, parses_to_the_precision_that_prints_as_it) {
  const auto& [name, precision] = GetParam();
  EXPECT_EQ(parse_precision(name), precision);
  EXPECT_EQ(to_string(precision), name);
}

INSTANTIATE_TEST_SUITE_P(all, precision_name,
                         ::testing::Values(std::pair{"fp32", Precision::fp32}, std::pair{"bf16", Precision::bf16},
                                           std::pair{"int8", Precision::int8}),
                         [](const auto& info) { return std::string(info.param.first); });

TEST(precision, unknown_name_is_a_data_error_naming_the_accepted_ones) {
  for (const std::string name : {"fp16", "FP32", "auto", ""}) {
    EXPECT_EQ(testing::error_message<DataError>([&] { parse_precision(name); }),
              "precision must be 'fp32', 'bf16' or 'int8', got '" + name + "'");
  }
}

}  // namespace
}  // namespace kiln
