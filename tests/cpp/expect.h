// The C++ tests' one assertion: expect(ok, what) counts and prints a failure; test_result() is main's exit code.
#pragma once

#include <cstdio>
#include <string>

namespace attnext::test {

inline int& failures() {
  static int n = 0;
  return n;
}

inline void expect(bool ok, const std::string& what) {
  if (ok) return;
  if (++failures() <= 20) std::printf("FAIL: %s\n", what.c_str());
}

// Prints the outcome under `name`; 0 when every expectation held.
inline int test_result(const char* name) {
  if (failures()) std::printf("%s: %d failures\n", name, failures());
  else std::printf("%s: all checks passed\n", name);
  return failures() ? 1 : 0;
}

}  // namespace attnext::test
