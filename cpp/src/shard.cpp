// Being written (issue 14); replaced before this lands.
#include "kiln/shard.hpp"
