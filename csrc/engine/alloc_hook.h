// Test hook: counts global operator new calls made by this library, so that a
// test can prove a decode step allocates nothing in steady state.
#pragma once

#include <cstdint>

namespace anemll {

void set_alloc_counting(bool on);
uint64_t alloc_count();
// Performs one operator new/delete pair: lets a test check the hook is live.
void alloc_probe();

}  // namespace anemll
