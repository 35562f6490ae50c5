// Error text that is safe to hand to Python: every message kiln builds from file contents goes
// through printable_utf8, so a hostile file cannot make a message that fails to decode as UTF-8.
#pragma once

#include <string>
#include <string_view>

namespace kiln::detail {

// `text` with valid, printable UTF-8 kept as it is and every other byte (invalid UTF-8, control
// characters other than tab, and newline unless `keep_newlines`) written as \xNN. A backslash
// stays a backslash.
std::string printable_utf8(std::string_view text, bool keep_newlines = false);

}  // namespace kiln::detail
