#include "kiln/distributed.hpp"

#include <gtest/gtest.h>

#include <ATen/ATen.h>

#include <cstdint>
#include <string>

#include "fixtures.hpp"
#include "kiln/detail/dropout.hpp"
#include "kiln/error.hpp"

// The collectives themselves run against torch.distributed's real groups in tests/test_distributed.py
// (torchrun, 2 gloo processes): the torch wheel ships no gloo headers to build a group here.
namespace kiln {
namespace {

TEST(distributed, a_trainer_on_an_unknown_process_group_names_it) {
  testing::TempDir dir;
  TrainerOptions options = testing::small_options(testing::write_halves_dataset(dir.path(), 8));
  options.process_group = "no-such-group";
  try {
    Trainer trainer(options);
    FAIL() << "expected kiln::DataError";
  } catch (const DataError& error) {
    EXPECT_NE(std::string(error.what()).find("no torch.distributed process group named 'no-such-group'"),
              std::string::npos)
        << error.what();
  }
}

TEST(distributed, ranks_draw_the_dropout_masks_of_their_rows_in_the_global_batch) {
  // One process, a global batch of 6 rows; 3 ranks hold rows {r, r + 3}.
  const at::Tensor ones = at::ones({6, 5, 4, 4}).contiguous(at::MemoryFormat::ChannelsLast);
  detail::DropoutStream single{11, 100};
  const at::Tensor global = detail::dropout(ones, 0.5, true, &single);
  for (std::uint64_t rank = 0; rank < 3; ++rank) {
    detail::DropoutStream stream{11, 100, rank, 3};
    const at::Tensor local = detail::dropout(ones.slice(0, 0, 2), 0.5, true, &stream);
    EXPECT_TRUE(at::equal(local, global.slice(0, rank, 6, 3))) << "rank " << rank;
    EXPECT_EQ(stream.offset, single.offset);  // every rank moves past the whole global batch
  }
  // The default layout is the one-process stream, unchanged.
  detail::DropoutStream again{11, 100};
  EXPECT_TRUE(at::equal(detail::dropout(ones, 0.5, true, &again), global));
}

}  // namespace
}  // namespace kiln
